/*
 * stunload: a closed-loop STUN Binding load generator for UDP (Linux).
 *
 *   stunload HOST PORT [--duration S] [--window N] [--batch B] [--sockets K]
 *            [--warmup S] [--timeout-ms T] [--max-requests M] [--software TEXT]
 *            [--allow-non-loopback] [--json]
 *
 * It keeps WINDOW Binding requests (RFC 8489) outstanding at all times: every valid
 * success response frees its slot and the slot is refilled at once, so the measured rate
 * is what the server sustains, not what we offer.  Requests carry a FINGERPRINT (and
 * optionally a SOFTWARE attribute) so the server has to CRC the message, as it would for
 * an ICE connectivity check.
 *
 * Matching is O(1): the transaction ID is
 *     bytes 0..3  slot index      XOR a per-run random key
 *     bytes 4..7  slot generation XOR a per-run random key
 *     bytes 8..11 random
 * so a response names its slot directly, and the full 12 bytes are then compared against
 * what that slot last sent.  A request unanswered after --timeout-ms is dropped and its
 * slot re-issued with a new generation (a fresh transaction), so the window never starves
 * and a late reply to the old transaction is counted as "late", never twice.
 *
 * Each socket is connect()ed (the kernel filters other sources) and non-blocking; I/O is
 * sendmmsg/recvmmsg in batches of B with poll() when idle.  With --sockets K the window
 * is spread over K sockets (slot i on socket i % K), i.e. K source ports, which is what
 * a server sharding by SO_REUSEPORT needs to see more than one of its workers busy.  The process is single-threaded,
 * so the caller can pin it with taskset.  Both the run time (warmup + duration) and the
 * number of requests (--max-requests) are hard bounds.
 *
 * Build: gcc -O2 -Wall -Wextra -o bench/build/stunload bench/stunload.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "wire.h"

#define STUN_HEADER 20
#define MAGIC_COOKIE 0x2112A442u
#define FINGERPRINT_XOR 0x5354554eu
#define ATTR_SOFTWARE 0x8022u
#define ATTR_FINGERPRINT 0x8028u
#define BINDING_REQUEST 0x0001u
#define BINDING_SUCCESS 0x0101u
#define BINDING_ERROR 0x0111u

#define MAX_SOFTWARE 128   /* RFC 8489 limits SOFTWARE to 128 characters */
#define REQ_BUF 256        /* header + SOFTWARE (<= 4 + 128) + FINGERPRINT fits easily */
#define RECV_BUF 2048      /* larger than any sane Binding response on loopback */
#define MAX_WINDOW 65536
#define MAX_BATCH 1024
#define MAX_SOCKETS 256
#define MAX_DURATION_S 3600.0
#define DEFAULT_MAX_REQUESTS 200000000ull

/* Latency histogram: 1 us buckets below 65.536 ms, then 1 ms buckets up to ~65 s.
 * Fine where it matters (loopback latencies are tens of microseconds) and bounded. */
#define FINE_BUCKETS 65536
#define COARSE_BUCKETS 65536

struct slot {
    uint64_t sent_ns;      /* when this slot's current request was handed to the kernel */
    uint32_t generation;   /* bumped on every (re)issue so stale replies never match */
    uint8_t in_flight;
    uint8_t tid[12];
    uint8_t buf[REQ_BUF];  /* the encoded request, reused for every issue of this slot */
};

struct lsock {
    int fd;
    int want_out;          /* last send hit a full buffer: poll for POLLOUT too */
    uint32_t nfree;
    uint32_t *free_list;   /* slots of this socket not currently in flight */
};

struct stats {
    uint64_t sent;
    uint64_t responses;      /* valid Binding success responses matching an outstanding id */
    uint64_t timeouts;       /* requests given up on (their slot was re-issued) */
    uint64_t late;           /* well-formed replies whose transaction is no longer outstanding */
    uint64_t invalid;        /* not a Binding success: malformed, wrong cookie, bad CRC... */
    uint64_t errors;         /* Binding error responses (0x0111) */
    uint64_t send_eagain;    /* sendmmsg found the socket buffer full */
    uint64_t icmp_errors;    /* ECONNREFUSED and friends reported on the connected socket */
    uint64_t lat_sum_ns;
    uint64_t lat_max_ns;
};

static volatile sig_atomic_t g_stop = 0;
static uint32_t crc_table[256];
static uint64_t fine_hist[FINE_BUCKETS];
static uint64_t coarse_hist[COARSE_BUCKETS];

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* CRC-32 as used by FINGERPRINT (ISO-HDLC: reflected 0x04C11DB7, init and xorout ~0). */
static uint32_t crc32_ieee(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* xorshift64*: the per-request random bytes need to be unpredictable-looking, not secret. */
static uint64_t rng_state;

static uint32_t rng32(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static void hist_add(uint64_t ns) {
    uint64_t us = ns / 1000u;
    if (us < FINE_BUCKETS) {
        fine_hist[us]++;
    } else {
        uint64_t ms = us / 1000u;
        coarse_hist[ms < COARSE_BUCKETS ? ms : COARSE_BUCKETS - 1]++;
    }
}

/* The latency (in us) below which a fraction q of the samples lie; bucket upper edge. */
static double hist_quantile(uint64_t total, double q) {
    if (total == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(q * (double)total);
    if (rank >= total)
        rank = total - 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < FINE_BUCKETS; i++) {
        seen += fine_hist[i];
        if (seen > rank)
            return (double)(i + 1);
    }
    for (size_t i = 0; i < COARSE_BUCKETS; i++) {
        seen += coarse_hist[i];
        if (seen > rank)
            return (double)(i + 1) * 1000.0;
    }
    return (double)COARSE_BUCKETS * 1000.0;
}

/* Lay out the parts of a request that never change: header, SOFTWARE, FINGERPRINT header. */
static size_t build_template(uint8_t *buf, const char *software) {
    size_t off = STUN_HEADER;
    if (software != NULL) {
        size_t n = strlen(software);
        put16(buf + off, ATTR_SOFTWARE);
        put16(buf + off + 2, (uint32_t)n);
        memcpy(buf + off + 4, software, n);
        off += 4 + n;
        while (off % 4 != 0)
            buf[off++] = 0; /* padding, not counted in the attribute length */
    }
    /* The header length already covers FINGERPRINT when the CRC is computed (RFC 8489
     * section 14.7), so it is written once here and never touched again. */
    put16(buf, BINDING_REQUEST);
    put16(buf + 2, (uint32_t)(off + 8 - STUN_HEADER));
    put32(buf + 4, MAGIC_COOKIE);
    put16(buf + off, ATTR_FINGERPRINT);
    put16(buf + off + 2, 4);
    return off + 8;
}

/* Give slot `idx` a fresh transaction ID and FINGERPRINT; the rest of buf is the template. */
static void issue(struct slot *s, uint32_t idx, uint32_t key0, uint32_t key1, size_t req_len) {
    s->generation++;
    put32(s->tid, idx ^ key0);
    put32(s->tid + 4, s->generation ^ key1);
    put32(s->tid + 8, rng32());
    memcpy(s->buf + 8, s->tid, 12);
    put32(s->buf + req_len - 4, crc32_ieee(s->buf, req_len - 8) ^ FINGERPRINT_XOR);
}

/* Structural checks shared by every reply: RFC 8489 section 6.3 and FINGERPRINT if present. */
static int well_formed(const uint8_t *p, size_t n) {
    if (n < STUN_HEADER || (p[0] & 0xC0u) != 0)
        return 0;
    uint32_t len = get16(p + 2);
    if (len % 4 != 0 || (size_t)len + STUN_HEADER != n)
        return 0;
    if (get32(p + 4) != MAGIC_COOKIE)
        return 0;
    /* Walk the attributes so a truncated TLV is caught and the last one is found. */
    size_t off = STUN_HEADER, last = 0;
    while (off < n) {
        if (off + 4 > n)
            return 0;
        size_t alen = get16(p + off + 2);
        size_t padded = (alen + 3u) & ~(size_t)3u;
        if (off + 4 + padded > n)
            return 0;
        last = off;
        off += 4 + padded;
    }
    if (last != 0 && get16(p + last) == ATTR_FINGERPRINT) {
        if (get16(p + last + 2) != 4 || last + 8 != n)
            return 0;
        if ((crc32_ieee(p, last) ^ FINGERPRINT_XOR) != get32(p + last + 4))
            return 0;
    }
    return 1;
}

static void close_all(struct lsock *socks, uint32_t n) {
    for (uint32_t j = 0; j < n; j++) {
        if (socks[j].fd >= 0)
            close(socks[j].fd);
        free(socks[j].free_list);
    }
    free(socks);
}

static int is_loopback(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr))
            return 1;
        return IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) && in6->sin6_addr.s6_addr[12] == 127;
    }
    return 0;
}

/* HOST comes from the command line, so quote it properly rather than trust it. */
static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: stunload HOST PORT [--duration S] [--window N] [--batch B] [--sockets K]\n"
            "                [--warmup S] [--timeout-ms T] [--max-requests M] [--software TEXT]\n"
            "                [--allow-non-loopback] [--json]\n"
            "  --duration S      measured seconds, after warmup (default 5, max 3600)\n"
            "  --window N        outstanding requests kept in flight, in all (default 128)\n"
            "  --batch B         datagrams per sendmmsg/recvmmsg (default 32)\n"
            "  --sockets K       spread the window over K sockets/source ports (default 1)\n"
            "  --warmup S        seconds of load before counting starts (default 0)\n"
            "  --timeout-ms T    give up on a request and re-issue it after T ms (default 200)\n"
            "  --max-requests M  hard bound on requests sent, warmup included (default %llu)\n"
            "  --software TEXT   add a SOFTWARE attribute (at most %d bytes)\n"
            "  --allow-non-loopback  permit a target outside 127.0.0.0/8 and ::1\n"
            "  --json            print one JSON object instead of text\n",
            DEFAULT_MAX_REQUESTS, MAX_SOFTWARE);
}

static int parse_double(const char *s, double *out) {
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0')
        return 0;
    *out = v;
    return 1;
}

static int parse_u64(const char *s, unsigned long long *out) {
    char *end = NULL;
    errno = 0;
    if (*s == '-')
        return 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0')
        return 0;
    *out = v;
    return 1;
}

int main(int argc, char **argv) {
    const char *host = NULL, *port = NULL, *software = NULL;
    double duration = 5.0, warmup = 0.0;
    unsigned long long window = 128, batch = 32, timeout_ms = 200, nsockets = 1;
    unsigned long long max_requests = DEFAULT_MAX_REQUESTS;
    int json = 0, allow_remote = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_val = i + 1 < argc;
        int ok = 1;
        if (strcmp(a, "--json") == 0) {
            json = 1;
        } else if (strcmp(a, "--allow-non-loopback") == 0) {
            allow_remote = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--duration") == 0 && has_val) {
            ok = parse_double(argv[++i], &duration);
        } else if (strcmp(a, "--warmup") == 0 && has_val) {
            ok = parse_double(argv[++i], &warmup);
        } else if (strcmp(a, "--window") == 0 && has_val) {
            ok = parse_u64(argv[++i], &window);
        } else if (strcmp(a, "--sockets") == 0 && has_val) {
            ok = parse_u64(argv[++i], &nsockets);
        } else if (strcmp(a, "--batch") == 0 && has_val) {
            ok = parse_u64(argv[++i], &batch);
        } else if (strcmp(a, "--timeout-ms") == 0 && has_val) {
            ok = parse_u64(argv[++i], &timeout_ms);
        } else if (strcmp(a, "--max-requests") == 0 && has_val) {
            ok = parse_u64(argv[++i], &max_requests);
        } else if (strcmp(a, "--software") == 0 && has_val) {
            software = argv[++i];
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "stunload: unknown option or missing value: %s\n", a);
            usage(stderr);
            return 2;
        } else if (host == NULL) {
            host = a;
        } else if (port == NULL) {
            port = a;
        } else {
            fprintf(stderr, "stunload: unexpected argument: %s\n", a);
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "stunload: bad value for %s\n", a);
            return 2;
        }
    }
    if (host == NULL || port == NULL) {
        usage(stderr);
        return 2;
    }
    /* Every bound is checked up front so a typo cannot turn into an unbounded run. */
    if (!(duration > 0.0 && duration <= MAX_DURATION_S) ||
        !(warmup >= 0.0 && warmup <= MAX_DURATION_S)) {
        fprintf(stderr, "stunload: --duration must be in (0, %g], --warmup in [0, %g]\n",
                MAX_DURATION_S, MAX_DURATION_S);
        return 2;
    }
    if (window < 1 || window > MAX_WINDOW || batch < 1 || batch > MAX_BATCH ||
        timeout_ms < 1 || timeout_ms > 60000 || max_requests < 1 || nsockets < 1 ||
        nsockets > MAX_SOCKETS || nsockets > window) {
        fprintf(stderr, "stunload: need 1 <= window <= %d, 1 <= batch <= %d, "
                        "1 <= sockets <= min(%d, window), 1 <= timeout-ms <= 60000, "
                        "max-requests >= 1\n",
                MAX_WINDOW, MAX_BATCH, MAX_SOCKETS);
        return 2;
    }
    if (software != NULL && strlen(software) > MAX_SOFTWARE) {
        fprintf(stderr, "stunload: --software is limited to %d bytes\n", MAX_SOFTWARE);
        return 2;
    }

    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = AI_NUMERICSERV;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai != 0) {
        fprintf(stderr, "stunload: %s:%s: %s\n", host, port, gai_strerror(gai));
        return 2;
    }
    if (!allow_remote && !is_loopback(ai->ai_addr)) {
        /* A load generator aimed at someone else's host is a flood; make that deliberate. */
        fprintf(stderr, "stunload: %s is not a loopback address (see --allow-non-loopback)\n",
                host);
        freeaddrinfo(ai);
        return 2;
    }
    uint32_t nsock = (uint32_t)nsockets;
    struct lsock *socks = calloc(nsock, sizeof *socks);
    if (socks == NULL) {
        fprintf(stderr, "stunload: out of memory\n");
        freeaddrinfo(ai);
        return 1;
    }
    for (uint32_t j = 0; j < nsock; j++)
        socks[j].fd = -1;
    for (uint32_t j = 0; j < nsock; j++) {
        int fd = socket(ai->ai_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            perror("stunload: socket");
            freeaddrinfo(ai);
            close_all(socks, nsock);
            return 1;
        }
        socks[j].fd = fd;
        /* Big buffers so a burst of a whole window never drops in our own socket. */
        int bufsz = 4 * 1024 * 1024;
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufsz, sizeof bufsz);
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufsz, sizeof bufsz);
        /* connect() gives each socket its own ephemeral port (so SO_REUSEPORT servers
         * spread the load by 4-tuple hash) and makes the kernel drop foreign datagrams. */
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            perror("stunload: connect");
            freeaddrinfo(ai);
            close_all(socks, nsock);
            return 1;
        }
    }
    unsigned port_num = ai->ai_family == AF_INET6
                            ? ntohs(((struct sockaddr_in6 *)ai->ai_addr)->sin6_port)
                            : ntohs(((struct sockaddr_in *)ai->ai_addr)->sin_port);
    freeaddrinfo(ai);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    crc_init();
    uint32_t keys[2];
    if (getrandom(&rng_state, sizeof rng_state, 0) != (ssize_t)sizeof rng_state ||
        getrandom(keys, sizeof keys, 0) != (ssize_t)sizeof keys) {
        perror("stunload: getrandom");
        close_all(socks, nsock);
        return 1;
    }
    rng_state |= 1u; /* xorshift must not start at zero */

    uint32_t nslots = (uint32_t)window, nbatch = (uint32_t)batch;
    uint32_t per_sock = (nslots + nsock - 1) / nsock;
    struct slot *slots = calloc(nslots, sizeof *slots);
    uint32_t *pending = malloc(nbatch * sizeof *pending);
    struct mmsghdr *smsg = calloc(nbatch, sizeof *smsg);
    struct iovec *siov = calloc(nbatch, sizeof *siov);
    struct mmsghdr *rmsg = calloc(nbatch, sizeof *rmsg);
    struct iovec *riov = calloc(nbatch, sizeof *riov);
    uint8_t *rbufs = malloc((size_t)nbatch * RECV_BUF);
    struct pollfd *pfds = calloc(nsock, sizeof *pfds);
    int oom = !slots || !pending || !smsg || !siov || !rmsg || !riov || !rbufs || !pfds;
    for (uint32_t j = 0; j < nsock && !oom; j++) {
        socks[j].free_list = malloc(per_sock * sizeof *socks[j].free_list);
        oom = socks[j].free_list == NULL;
    }
    if (oom) {
        fprintf(stderr, "stunload: out of memory\n");
        close_all(socks, nsock);
        return 1;
    }
    uint8_t tmpl[REQ_BUF];
    memset(tmpl, 0, sizeof tmpl);
    size_t req_len = build_template(tmpl, software);
    /* Slot i always travels on socket i % nsock; pushed in reverse so slot 0 goes first. */
    for (uint32_t i = nslots; i-- > 0;) {
        memcpy(slots[i].buf, tmpl, req_len);
        struct lsock *k = &socks[i % nsock];
        k->free_list[k->nfree++] = i;
    }
    for (uint32_t i = 0; i < nbatch; i++) {
        riov[i].iov_base = rbufs + (size_t)i * RECV_BUF;
        riov[i].iov_len = RECV_BUF;
        rmsg[i].msg_hdr.msg_iov = &riov[i];
        rmsg[i].msg_hdr.msg_iovlen = 1;
        siov[i].iov_len = req_len;
        smsg[i].msg_hdr.msg_iov = &siov[i];
        smsg[i].msg_hdr.msg_iovlen = 1;
    }

    struct stats st;
    memset(&st, 0, sizeof st);
    uint64_t total_sent = 0; /* warmup included: this is what --max-requests bounds */
    const uint64_t timeout_ns = timeout_ms * 1000000ull;
    /* Scanning the window for timeouts is O(N), so do it a few times per timeout only. */
    const uint64_t scan_every_ns = timeout_ns / 4 > 1000000ull ? timeout_ns / 4 : 1000000ull;
    const uint64_t t_start = now_ns();
    const uint64_t t_measure = t_start + (uint64_t)(warmup * 1e9);
    const uint64_t t_end = t_measure + (uint64_t)(duration * 1e9);
    uint64_t next_scan = t_start + scan_every_ns;
    int measuring = warmup <= 0.0;
    int fatal = 0;
    struct rusage ru0;
    getrusage(RUSAGE_SELF, &ru0);

    for (;;) {
        uint64_t now = now_ns();
        if (g_stop || fatal || now >= t_end)
            break;
        if (!measuring && now >= t_measure) {
            /* Throw away warmup numbers; in-flight requests simply carry over. */
            memset(&st, 0, sizeof st);
            memset(fine_hist, 0, sizeof fine_hist);
            memset(coarse_hist, 0, sizeof coarse_hist);
            getrusage(RUSAGE_SELF, &ru0);
            measuring = 1;
        }
        if (now >= next_scan) {
            for (uint32_t i = 0; i < nslots; i++) {
                if (slots[i].in_flight && now - slots[i].sent_ns >= timeout_ns) {
                    struct lsock *k = &socks[i % nsock];
                    slots[i].in_flight = 0;
                    k->free_list[k->nfree++] = i;
                    st.timeouts++;
                }
            }
            next_scan = now + scan_every_ns;
        }

        uint32_t received = 0;
        for (uint32_t j = 0; j < nsock; j++) {
            struct lsock *k = &socks[j];
            /* Refill this socket's share of the window, a batch at a time. */
            k->want_out = 0;
            while (k->nfree > 0 && total_sent < max_requests) {
                uint32_t n = k->nfree < nbatch ? k->nfree : nbatch;
                if ((uint64_t)n > max_requests - total_sent)
                    n = (uint32_t)(max_requests - total_sent);
                for (uint32_t q = 0; q < n; q++) {
                    uint32_t idx = k->free_list[--k->nfree];
                    pending[q] = idx;
                    issue(&slots[idx], idx, keys[0], keys[1], req_len);
                    siov[q].iov_base = slots[idx].buf;
                }
                int r = sendmmsg(k->fd, smsg, n, MSG_DONTWAIT);
                uint64_t t_sent = now_ns();
                uint32_t done = r > 0 ? (uint32_t)r : 0;
                for (uint32_t q = 0; q < done; q++) {
                    slots[pending[q]].sent_ns = t_sent;
                    slots[pending[q]].in_flight = 1;
                }
                /* Whatever the kernel did not take goes back to the free list for later. */
                for (uint32_t q = n; q > done; q--)
                    k->free_list[k->nfree++] = pending[q - 1];
                st.sent += done;
                total_sent += done;
                if (r < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                        st.send_eagain++;
                        k->want_out = 1;
                    } else if (errno == ECONNREFUSED || errno == EHOSTUNREACH ||
                               errno == ENETUNREACH) {
                        st.icmp_errors++; /* nobody listening (yet): timeouts will retry */
                    } else if (errno != EINTR) {
                        perror("stunload: sendmmsg");
                        fatal = 1;
                    }
                    break;
                }
                if (done < n) {
                    k->want_out = 1;
                    break;
                }
            }

            int r = recvmmsg(k->fd, rmsg, nbatch, MSG_DONTWAIT, NULL);
            if (r < 0) {
                if (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH) {
                    st.icmp_errors++;
                } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    perror("stunload: recvmmsg");
                    fatal = 1;
                }
                continue;
            }
            received += (uint32_t)r;
            uint64_t t_recv = now_ns();
            for (int q = 0; q < r; q++) {
                const uint8_t *p = riov[q].iov_base;
                size_t n = rmsg[q].msg_len;
                if (!well_formed(p, n)) {
                    st.invalid++;
                    continue;
                }
                uint32_t type = get16(p);
                uint32_t idx = get32(p + 8) ^ keys[0];
                struct slot *s = idx < nslots ? &slots[idx] : NULL;
                if (s == NULL || !s->in_flight || memcmp(s->tid, p + 8, 12) != 0) {
                    if (type == BINDING_SUCCESS || type == BINDING_ERROR)
                        st.late++;
                    else
                        st.invalid++;
                    continue;
                }
                if (type != BINDING_SUCCESS) {
                    /* An answer, but not a success: free the slot, do not count it. */
                    if (type == BINDING_ERROR)
                        st.errors++;
                    else
                        st.invalid++;
                } else {
                    uint64_t lat = t_recv - s->sent_ns;
                    st.responses++;
                    st.lat_sum_ns += lat;
                    if (lat > st.lat_max_ns)
                        st.lat_max_ns = lat;
                    hist_add(lat);
                }
                s->in_flight = 0;
                struct lsock *owner = &socks[idx % nsock];
                owner->free_list[owner->nfree++] = idx;
            }
        }
        if (received > 0)
            continue;

        /* Nothing to read anywhere: sleep until there is, but never past the next deadline. */
        uint64_t wake = t_end < next_scan ? t_end : next_scan;
        if (!measuring && t_measure < wake)
            wake = t_measure;
        now = now_ns();
        int wait_ms = wake > now ? (int)((wake - now + 999999u) / 1000000u) : 0;
        if (wait_ms > 10)
            wait_ms = 10; /* keeps the stop check responsive whatever happens */
        for (uint32_t j = 0; j < nsock; j++) {
            pfds[j].fd = socks[j].fd;
            pfds[j].events = POLLIN | (socks[j].want_out ? POLLOUT : 0);
            pfds[j].revents = 0;
        }
        (void)poll(pfds, nsock, wait_ms);
    }

    uint64_t t_stop = now_ns();
    struct rusage ru1;
    getrusage(RUSAGE_SELF, &ru1);
    uint64_t since = measuring ? t_measure : t_start;
    double elapsed = (double)(t_stop > since ? t_stop - since : 1) / 1e9;
    double cpu_user = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                      (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double cpu_sys = (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                     (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    double cpu_pct = 100.0 * (cpu_user + cpu_sys) / elapsed;
    double rate = (double)st.responses / elapsed;
    double p50 = hist_quantile(st.responses, 0.50);
    double p99 = hist_quantile(st.responses, 0.99);
    double p999 = hist_quantile(st.responses, 0.999);
    double mean = st.responses ? (double)st.lat_sum_ns / (double)st.responses / 1000.0 : 0.0;
    double maxl = (double)st.lat_max_ns / 1000.0;
    uint64_t outstanding = 0;
    for (uint32_t i = 0; i < nslots; i++)
        outstanding += slots[i].in_flight;

    if (json) {
        printf("{\"host\": ");
        json_string(stdout, host);
        printf(", \"port\": %u, \"window\": %u, \"batch\": %u, \"sockets\": %u, "
               "\"request_bytes\": %zu, \"elapsed_s\": %.6f, \"warmup_s\": %.3f, "
               "\"requests_sent\": %llu, \"responses\": %llu, \"responses_per_s\": %.1f, "
               "\"timeouts\": %llu, \"late\": %llu, \"invalid\": %llu, \"errors\": %llu, "
               "\"outstanding_at_end\": %llu, \"send_eagain\": %llu, \"icmp_errors\": %llu, "
               "\"p50_us\": %.0f, \"p99_us\": %.0f, \"p999_us\": %.0f, \"mean_us\": %.1f, "
               "\"max_us\": %.1f, \"cpu_user_s\": %.3f, \"cpu_sys_s\": %.3f, "
               "\"cpu_pct\": %.1f, \"interrupted\": %s}\n",
               port_num, nslots, nbatch, nsock, req_len, elapsed, measuring ? warmup : 0.0,
               (unsigned long long)st.sent, (unsigned long long)st.responses, rate,
               (unsigned long long)st.timeouts, (unsigned long long)st.late,
               (unsigned long long)st.invalid, (unsigned long long)st.errors,
               (unsigned long long)outstanding, (unsigned long long)st.send_eagain,
               (unsigned long long)st.icmp_errors, p50, p99, p999, mean, maxl, cpu_user,
               cpu_sys, cpu_pct, g_stop ? "true" : "false");
    } else {
        printf("target          %s:%u (window %u, batch %u, %u socket(s), %zu-byte requests)\n",
               host, port_num, nslots, nbatch, nsock, req_len);
        printf("elapsed         %.3f s (after %.3f s warmup)\n", elapsed,
               measuring ? warmup : 0.0);
        printf("requests sent   %llu\n", (unsigned long long)st.sent);
        printf("responses       %llu\n", (unsigned long long)st.responses);
        printf("responses/s     %.1f\n", rate);
        printf("latency         p50 %.0f us, p99 %.0f us, p99.9 %.0f us, mean %.1f us, "
               "max %.1f us\n",
               p50, p99, p999, mean, maxl);
        printf("timeouts        %llu (re-issued), late %llu, invalid %llu, errors %llu\n",
               (unsigned long long)st.timeouts, (unsigned long long)st.late,
               (unsigned long long)st.invalid, (unsigned long long)st.errors);
        printf("generator cpu   %.1f%% (user %.3f s, sys %.3f s)\n", cpu_pct, cpu_user,
               cpu_sys);
    }
    fflush(stdout);

    free(slots);
    free(pending);
    free(pfds);
    free(smsg);
    free(siov);
    free(rmsg);
    free(riov);
    free(rbufs);
    close_all(socks, nsock);
    /* Exit 3 if nothing answered, so a script cannot mistake a dead server for a result. */
    return st.responses > 0 ? 0 : 3;
}
