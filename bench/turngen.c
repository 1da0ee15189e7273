/*
 * turngen: the C load generator of bench/bench_turn_server.py (Linux, UDP over loopback).
 *
 *   turngen sink [IP]
 *       Bind IP:0 (default 127.0.0.1), print the port, count the datagrams that arrive (recvmmsg) and
 *       print the count for every line read on stdin; exit on EOF.
 *   turngen blast FD SECONDS HEX
 *       Wait for a line on stdin, then send the frame HEX on the connected UDP socket FD
 *       (sendmmsg, 64 at a time) for SECONDS; print {"sent": N, "elapsed": S}.
 *   turngen alloc HOST PORT --key HEX --user NAME --realm REALM [options]
 *       Allocations per second, closed loop: WINDOW sessions at once, each a new UDP
 *       socket (a new 5-tuple) doing the long-term credential handshake of RFC 8656 §7 /
 *       RFC 8489 §9.2: Allocate without credentials -> 401 with NONCE -> Allocate with
 *       USERNAME, REALM, NONCE and MESSAGE-INTEGRITY -> success; with --dealloc then a
 *       Refresh with LIFETIME 0 (the allocation is deleted), then the socket is closed and
 *       the slot starts a new session at once. Runs for --duration seconds and at most
 *       --max allocations; prints one JSON line.
 *   turngen hold HOST PORT --key HEX --user NAME --realm REALM --peer IP:PORT
 *                --checkpoints N1,N2,...
 *       Open allocations and keep them: each session does the handshake above, then
 *       CreatePermission and ChannelBind (channel 0x4000) towards --peer, and its socket
 *       stays open. At every checkpoint (that many allocations held) it prints a JSON line
 *       and waits for a line on stdin before going on; after the last one it waits for a
 *       line (or EOF) and exits, closing every socket.
 *   turngen hmac KEYHEX MSGHEX
 *       Print HMAC-SHA1(key, msg) in hex (a self-test of the embedded SHA-1).
 *
 * Options of alloc and hold:
 *   --sources IP/COUNT   client addresses: COUNT consecutive IPv4 addresses from IP, used
 *                        round robin (default 127.0.2.1/200); each session binds port 0
 *   --window W           sessions in flight at once (default 64)
 *   --duration S         alloc: measuring time; hold: overall limit (default 3 / 120)
 *   --max N              alloc: allocations at most (default 1000000)
 *   --timeout-ms T       retransmit a request unanswered after T ms, 3 times at most,
 *                        then give the session up (default 500)
 *
 * The key is the long-term credential key MD5(username ":" realm ":" password) (RFC 8489
 * §9.2.2), computed by the caller; integrity is HMAC-SHA1 (MESSAGE-INTEGRITY), with a
 * SHA-1 written here (FIPS 180-4) so the generator needs no library. Responses are matched
 * by socket and transaction ID and their class and ERROR-CODE checked; their integrity is
 * not verified (the generator's cost should stay small next to the server's).
 * Only 127.0.0.0/8 is accepted as the server or as a source. Every mode is bounded in
 * time; alloc and hold also in count.
 *
 * Build: gcc -O2 -Wall -Wextra -o bench/build/turngen bench/turngen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "wire.h"

#define BATCH 64
#define MAGIC_COOKIE 0x2112A442u

#define ALLOCATE_REQUEST 0x0003u
#define ALLOCATE_SUCCESS 0x0103u
#define ALLOCATE_ERROR 0x0113u
#define REFRESH_REQUEST 0x0004u
#define REFRESH_SUCCESS 0x0104u
#define PERMISSION_REQUEST 0x0008u
#define PERMISSION_SUCCESS 0x0108u
#define CHANNEL_REQUEST 0x0009u
#define CHANNEL_SUCCESS 0x0109u

#define ATTR_USERNAME 0x0006u
#define ATTR_MESSAGE_INTEGRITY 0x0008u
#define ATTR_ERROR_CODE 0x0009u
#define ATTR_CHANNEL_NUMBER 0x000Cu
#define ATTR_LIFETIME 0x000Du
#define ATTR_XOR_PEER_ADDRESS 0x0012u
#define ATTR_REALM 0x0014u
#define ATTR_NONCE 0x0015u
#define ATTR_REQUESTED_TRANSPORT 0x0019u

#define MAX_WINDOW 1024
#define MAX_TEXT 256       /* username, realm, nonce: longer ones are refused */
#define REQ_BUF 1024
#define RECV_BUF 2048
#define RETRIES 3
#define LAT_BUCKETS 200000 /* 10 us buckets up to 2 s */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_hex(const char *hex, uint8_t *out, size_t max) {
    size_t n = strlen(hex);
    if (n % 2 != 0 || n / 2 > max)
        return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    return (int)(n / 2);
}

/* --- SHA-1 and HMAC-SHA1 ------------------------------------------------------------- */

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = get32(p + 4 * i);
    for (int i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999u;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1u;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDCu;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6u;
        }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static const uint32_t SHA1_INIT[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u,
                                      0xC3D2E1F0u};

/* SHA-1 of (the `prefix` bytes already folded into `state`, a multiple of 64) || msg. */
static void sha1_from(const uint32_t state[5], uint64_t prefix, const uint8_t *msg,
                      size_t len, uint8_t out[20]) {
    uint32_t h[5];
    memcpy(h, state, sizeof h);
    size_t done = 0;
    for (; done + 64 <= len; done += 64)
        sha1_block(h, msg + done);
    uint8_t tail[128];
    size_t rest = len - done;
    memset(tail, 0, sizeof tail);
    memcpy(tail, msg + done, rest);
    tail[rest] = 0x80;
    size_t blocks = rest + 9 <= 64 ? 1 : 2;
    uint64_t bits = (prefix + len) * 8u;
    put32(tail + 64 * blocks - 8, (uint32_t)(bits >> 32));
    put32(tail + 64 * blocks - 4, (uint32_t)bits);
    for (size_t i = 0; i < blocks; i++)
        sha1_block(h, tail + 64 * i);
    for (int i = 0; i < 5; i++)
        put32(out + 4 * i, h[i]);
}

struct hmac {
    uint32_t inner[5]; /* SHA-1 state after the key XOR ipad block */
    uint32_t outer[5]; /* ... after the key XOR opad block */
};

static void hmac_init(struct hmac *m, const uint8_t *key, size_t len) {
    uint8_t block[64];
    uint8_t hashed[20];
    if (len > 64) { /* never for a 16-byte MD5 key, but HMAC says so (RFC 2104) */
        sha1_from(SHA1_INIT, 0, key, len, hashed);
        key = hashed;
        len = sizeof hashed;
    }
    for (int pass = 0; pass < 2; pass++) {
        uint8_t pad = pass == 0 ? 0x36 : 0x5c;
        memset(block, pad, sizeof block);
        for (size_t i = 0; i < len; i++)
            block[i] = (uint8_t)(key[i] ^ pad);
        uint32_t *state = pass == 0 ? m->inner : m->outer;
        memcpy(state, SHA1_INIT, sizeof SHA1_INIT);
        sha1_block(state, block);
    }
}

static void hmac_sha1(const struct hmac *m, const uint8_t *msg, size_t len, uint8_t out[20]) {
    uint8_t inner[20];
    sha1_from(m->inner, 64, msg, len, inner);
    sha1_from(m->outer, 64, inner, sizeof inner, out);
}

/* --- sink and blast: the relay data plane ------------------------------------------ */

static long long drain(int fd, struct mmsghdr *msgs) {
    long long count = 0;
    int n;
    while ((n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL)) > 0)
        count += n;
    return count;
}

static int loopback(uint32_t ip) { return (ip >> 24) == 127; }

static int parse_ip(const char *text, uint32_t *ip) {
    struct in_addr a;
    if (inet_pton(AF_INET, text, &a) != 1)
        return -1;
    *ip = ntohl(a.s_addr);
    return loopback(*ip) ? 0 : -1;
}

static int sink(const char *ip_text) {
    uint32_t ip;
    if (parse_ip(ip_text, &ip))
        return 2;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int size = 1 << 24;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(ip)};
    socklen_t len = sizeof addr;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) ||
        getsockname(fd, (struct sockaddr *)&addr, &len))
        return 1;
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    static char buffers[BATCH][2048];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buffers[i];
        iov[i].iov_len = sizeof buffers[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long long count = 0;
    struct pollfd fds[2] = {{fd, POLLIN, 0}, {0, POLLIN, 0}};
    char line[64];
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (fds[0].revents & POLLIN)
            count += drain(fd, msgs);
        if (fds[1].revents & (POLLIN | POLLHUP)) {
            if (!fgets(line, sizeof line, stdin))
                return 0;
            count += drain(fd, msgs);
            printf("%lld\n", count);
            fflush(stdout);
        }
    }
}

static int blast(int fd, double seconds, const char *hex) {
    static uint8_t frame[65536];
    int len = parse_hex(hex, frame, sizeof frame);
    if (len < 0 || seconds <= 0 || seconds > 600)
        return 1;
    struct iovec iov = {frame, (size_t)len};
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    long long sent = 0;
    double start = now_s(), stop = start + seconds, t = start;
    for (unsigned round = 0; t < stop; round++) {
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0) /* else ENOBUFS, or an ICMP error reported: go on */
            sent += n;
        if ((round & 15) == 0)
            t = now_s();
    }
    printf("{\"sent\": %lld, \"elapsed\": %.6f}\n", sent, now_s() - start);
    return 0;
}

/* --- alloc and hold: the control plane ---------------------------------------------- */

enum state { IDLE, CHALLENGE, ALLOCATE, REFRESH, PERMISSION, CHANNEL };

struct slot {
    int fd;
    enum state state;
    int retries;
    int stale;
    double sent;  /* when the current request was (re)sent */
    double began; /* when the session's first request was sent */
    size_t req_len;
    size_t nonce_len;
    uint8_t tid[12];
    uint8_t nonce[MAX_TEXT];
    uint8_t req[REQ_BUF];
};

struct options {
    uint32_t server_ip, source_ip, source_count;
    uint16_t server_port;
    uint32_t peer_ip;
    uint16_t peer_port;
    const char *user, *realm;
    uint8_t key[64];
    int key_len;
    int window;
    double duration;
    double timeout;
    long long max;
    long long checkpoints[32];
    int n_checkpoints;
    int dealloc;
    int hold;
};

struct counts {
    long long allocations, sessions, requests, retransmits, timeouts, stale, errors, refused;
    long long deallocated, held, late;
    int first_error;
};

static struct options opt;
static struct counts cnt;
static struct hmac mac;
static struct slot slots[MAX_WINDOW];
static int epfd;
static uint32_t next_source;
static uint64_t rng_state;
static uint32_t lat_hist[LAT_BUCKETS];
static long long lat_count;
static int *held_fds;
static long long held_cap;

static uint32_t rng32(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static void lat_add(double seconds) {
    long long bucket = (long long)(seconds * 1e5);
    if (bucket < 0)
        bucket = 0;
    if (bucket >= LAT_BUCKETS)
        bucket = LAT_BUCKETS - 1;
    lat_hist[bucket]++;
    lat_count++;
}

static double lat_quantile(double q) {
    if (lat_count == 0)
        return 0.0;
    long long rank = (long long)(q * (double)lat_count), seen = 0;
    if (rank >= lat_count)
        rank = lat_count - 1;
    for (int i = 0; i < LAT_BUCKETS; i++) {
        seen += lat_hist[i];
        if (seen > rank)
            return (i + 1) * 10.0;
    }
    return LAT_BUCKETS * 10.0;
}

static size_t attr(uint8_t *buf, size_t off, uint32_t type, const void *value, size_t len) {
    put16(buf + off, type);
    put16(buf + off + 2, (uint32_t)len);
    memcpy(buf + off + 4, value, len);
    size_t padded = (len + 3) & ~(size_t)3;
    memset(buf + off + 4 + len, 0, padded - len);
    return off + 4 + padded;
}

/* Lay out a request in the slot: header, the method's attributes, and the credentials
 * with MESSAGE-INTEGRITY when `signed_`. A fresh transaction ID every time. */
static void build(struct slot *s, uint32_t type, int signed_) {
    uint8_t *b = s->req;
    put16(b, type);
    put32(b + 4, MAGIC_COOKIE);
    for (int i = 0; i < 3; i++)
        put32(s->tid + 4 * i, rng32());
    memcpy(b + 8, s->tid, 12);
    size_t off = 20;
    uint8_t v[8];
    if (type == ALLOCATE_REQUEST) {
        uint8_t transport[4] = {17, 0, 0, 0};
        off = attr(b, off, ATTR_REQUESTED_TRANSPORT, transport, 4);
    } else if (type == REFRESH_REQUEST) {
        put32(v, 0);
        off = attr(b, off, ATTR_LIFETIME, v, 4);
    } else {
        if (type == CHANNEL_REQUEST) {
            put16(v, 0x4000);
            put16(v + 2, 0);
            off = attr(b, off, ATTR_CHANNEL_NUMBER, v, 4);
        }
        v[0] = 0;
        v[1] = 1;
        put16(v + 2, opt.peer_port ^ (MAGIC_COOKIE >> 16));
        put32(v + 4, opt.peer_ip ^ MAGIC_COOKIE);
        off = attr(b, off, ATTR_XOR_PEER_ADDRESS, v, 8);
    }
    if (signed_) {
        off = attr(b, off, ATTR_USERNAME, opt.user, strlen(opt.user));
        off = attr(b, off, ATTR_REALM, opt.realm, strlen(opt.realm));
        off = attr(b, off, ATTR_NONCE, s->nonce, s->nonce_len);
        put16(b + 2, (uint32_t)(off - 20 + 24)); /* the length covers MESSAGE-INTEGRITY */
        uint8_t digest[20];
        hmac_sha1(&mac, b, off, digest);
        off = attr(b, off, ATTR_MESSAGE_INTEGRITY, digest, 20);
    }
    put16(b + 2, (uint32_t)(off - 20));
    s->req_len = off;
}

static void count_error(int code) {
    cnt.errors++;
    if (cnt.first_error == 0)
        cnt.first_error = code;
}

static int transmit(struct slot *s, double now) {
    s->sent = now;
    cnt.requests++;
    if (send(s->fd, s->req, s->req_len, 0) < 0 && errno != EAGAIN && errno != ENOBUFS) {
        cnt.refused++;
        return -1;
    }
    return 0;
}

static void end_session(struct slot *s) {
    if (s->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
    }
    s->fd = -1;
    s->state = IDLE;
}

/* A new 5-tuple: a socket on the next source address, then Allocate without credentials. */
static void start_session(struct slot *s, int index, double now) {
    s->state = IDLE;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        count_error(-errno);
        return;
    }
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(opt.source_ip + next_source++ % opt.source_count);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(opt.server_port)};
    dst.sin_addr.s_addr = htonl(opt.server_ip);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)index};
    if (bind(fd, (struct sockaddr *)&src, sizeof src) ||
        connect(fd, (struct sockaddr *)&dst, sizeof dst) ||
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev)) {
        count_error(-errno);
        close(fd);
        return;
    }
    s->fd = fd;
    s->state = CHALLENGE;
    s->retries = s->stale = 0;
    s->nonce_len = 0;
    s->began = now;
    cnt.sessions++;
    build(s, ALLOCATE_REQUEST, 0);
    if (transmit(s, now))
        end_session(s);
}

/* The ERROR-CODE (0 if none) and NONCE of a response. */
static int parse_error(const uint8_t *p, size_t len, struct slot *s) {
    int code = 0;
    size_t off = 20;
    while (off + 4 <= len) {
        uint32_t type = get16(p + off), alen = get16(p + off + 2);
        if (off + 4 + alen > len)
            break;
        const uint8_t *v = p + off + 4;
        if (type == ATTR_ERROR_CODE && alen >= 4)
            code = (v[2] & 7) * 100 + v[3];
        else if (type == ATTR_NONCE && alen <= MAX_TEXT) {
            memcpy(s->nonce, v, alen);
            s->nonce_len = alen;
        }
        off += 4 + ((alen + 3) & ~3u);
    }
    return code;
}

static void step(struct slot *s, uint32_t type, double now) {
    s->retries = 0;
    build(s, type, 1);
    if (transmit(s, now))
        end_session(s);
}

static void hold_socket(struct slot *s) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
    if (cnt.held < held_cap)
        held_fds[cnt.held] = s->fd;
    cnt.held++;
    s->fd = -1;
    s->state = IDLE;
}

/* One datagram on a slot's socket. */
static void on_response(struct slot *s, const uint8_t *p, size_t len, double now,
                        int measuring) {
    if (len < 20 || get32(p + 4) != MAGIC_COOKIE || memcmp(p + 8, s->tid, 12) != 0) {
        cnt.late++;
        return;
    }
    uint32_t type = get16(p);
    int is_error = (type & 0x0110u) == 0x0110u;
    int code = is_error ? parse_error(p, len, s) : 0;
    switch (s->state) {
    case CHALLENGE:
        if (type == ALLOCATE_ERROR && code == 401 && s->nonce_len > 0) {
            s->state = ALLOCATE;
            step(s, ALLOCATE_REQUEST, now);
            return;
        }
        break;
    case ALLOCATE:
        if (type == ALLOCATE_SUCCESS) {
            if (measuring) {
                cnt.allocations++;
                lat_add(now - s->began);
            }
            if (opt.hold) {
                s->state = PERMISSION;
                step(s, PERMISSION_REQUEST, now);
            } else if (opt.dealloc) {
                s->state = REFRESH;
                step(s, REFRESH_REQUEST, now);
            } else {
                end_session(s);
            }
            return;
        }
        if (type == ALLOCATE_ERROR && code == 438 && s->stale++ < RETRIES) {
            cnt.stale++;
            step(s, ALLOCATE_REQUEST, now);
            return;
        }
        break;
    case REFRESH:
        if (type == REFRESH_SUCCESS || (is_error && code == 437 && s->retries > 0)) {
            cnt.deallocated++;
            end_session(s);
            return;
        }
        break;
    case PERMISSION:
        if (type == PERMISSION_SUCCESS) {
            s->state = CHANNEL;
            step(s, CHANNEL_REQUEST, now);
            return;
        }
        break;
    case CHANNEL:
        if (type == CHANNEL_SUCCESS) {
            lat_add(now - s->began);
            hold_socket(s);
            return;
        }
        break;
    case IDLE:
        return;
    }
    count_error(code ? code : (int)type);
    end_session(s);
}

static void check_timers(double now) {
    for (int i = 0; i < opt.window; i++) {
        struct slot *s = &slots[i];
        if (s->state == IDLE || now - s->sent < opt.timeout)
            continue;
        if (s->retries++ < RETRIES) {
            cnt.retransmits++;
            if (transmit(s, now))
                end_session(s);
        } else {
            cnt.timeouts++;
            end_session(s);
        }
    }
}

static int active_slots(void) {
    int n = 0;
    for (int i = 0; i < opt.window; i++)
        n += slots[i].state != IDLE;
    return n;
}

/* Run the event loop until `until` (absolute) or until `want` sessions have been started
 * (hold: allocations held or in flight) and all are done. */
static void run(double until, long long want, int measuring) {
    static struct epoll_event events[256];
    static uint8_t buf[RECV_BUF];
    double last_scan = 0;
    for (;;) {
        double now = now_s();
        if (now >= until)
            return;
        int active = active_slots();
        long long done = opt.hold ? cnt.held : cnt.allocations;
        for (int i = 0; i < opt.window && done + active < want; i++) {
            if (slots[i].state != IDLE)
                continue;
            start_session(&slots[i], i, now);
            active += slots[i].state != IDLE;
            if (slots[i].state == IDLE)
                break; /* no socket to be had (EMFILE...): try again on the next turn */
        }
        if (active == 0)
            return;
        int n = epoll_wait(epfd, events, 256, 5);
        now = now_s();
        for (int e = 0; e < n; e++) {
            int index = (int)events[e].data.u32;
            struct slot *s = &slots[index];
            for (int k = 0; k < 4 && s->fd >= 0; k++) {
                ssize_t got = recv(s->fd, buf, sizeof buf, 0);
                if (got < 0) {
                    if (errno != EAGAIN && errno != EINTR) { /* ICMP: nobody listening */
                        cnt.refused++;
                        end_session(s);
                    }
                    break;
                }
                on_response(s, buf, (size_t)got, now, measuring);
            }
        }
        if (now - last_scan > 0.002) {
            check_timers(now);
            last_scan = now;
        }
    }
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static int usage(void) {
    fprintf(stderr,
            "usage: turngen sink [IP] | blast FD SECONDS HEX | hmac KEYHEX MSGHEX\n"
            "       turngen alloc|hold HOST PORT --key HEX --user NAME --realm REALM\n"
            "               [--sources IP/COUNT] [--window W] [--duration S] [--max N]\n"
            "               [--timeout-ms T] [--dealloc] [--peer IP:PORT]\n"
            "               [--checkpoints N1,N2,...]   (loopback addresses only)\n");
    return 2;
}

static int control(int argc, char **argv) {
    opt.hold = !strcmp(argv[1], "hold");
    opt.window = 64;
    opt.duration = opt.hold ? 120.0 : 3.0;
    opt.timeout = 0.5;
    opt.max = 1000000;
    opt.source_count = 200;
    parse_ip("127.0.2.1", &opt.source_ip);
    if (parse_ip(argv[2], &opt.server_ip)) {
        fprintf(stderr, "turngen: the server must be a 127.0.0.0/8 address\n");
        return 2;
    }
    opt.server_port = (uint16_t)atoi(argv[3]);
    opt.key_len = -1;
    for (int i = 4; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--dealloc")) {
            opt.dealloc = 1;
            continue;
        }
        if (v == NULL)
            return usage();
        i++;
        if (!strcmp(a, "--key"))
            opt.key_len = parse_hex(v, opt.key, sizeof opt.key);
        else if (!strcmp(a, "--user"))
            opt.user = v;
        else if (!strcmp(a, "--realm"))
            opt.realm = v;
        else if (!strcmp(a, "--window"))
            opt.window = atoi(v);
        else if (!strcmp(a, "--duration"))
            opt.duration = atof(v);
        else if (!strcmp(a, "--max"))
            opt.max = atoll(v);
        else if (!strcmp(a, "--timeout-ms"))
            opt.timeout = atoi(v) / 1000.0;
        else if (!strcmp(a, "--sources")) {
            char ip[64];
            const char *slash = strchr(v, '/');
            if (slash == NULL || (size_t)(slash - v) >= sizeof ip)
                return usage();
            memcpy(ip, v, (size_t)(slash - v));
            ip[slash - v] = 0;
            opt.source_count = (uint32_t)atoi(slash + 1);
            if (parse_ip(ip, &opt.source_ip) || opt.source_count < 1 ||
                !loopback(opt.source_ip + opt.source_count - 1))
                return usage();
        } else if (!strcmp(a, "--peer")) {
            char ip[64];
            const char *colon = strchr(v, ':');
            if (colon == NULL || (size_t)(colon - v) >= sizeof ip)
                return usage();
            memcpy(ip, v, (size_t)(colon - v));
            ip[colon - v] = 0;
            opt.peer_port = (uint16_t)atoi(colon + 1);
            if (parse_ip(ip, &opt.peer_ip))
                return usage();
        } else if (!strcmp(a, "--checkpoints")) {
            char *end;
            for (const char *p = v; *p && opt.n_checkpoints < 32; p = *end ? end + 1 : end) {
                long long n = strtoll(p, &end, 10);
                if (end == p || n < 1 ||
                    (opt.n_checkpoints && n <= opt.checkpoints[opt.n_checkpoints - 1]))
                    return usage();
                opt.checkpoints[opt.n_checkpoints++] = n;
            }
        } else
            return usage();
    }
    if (opt.key_len < 1 || !opt.user || !opt.realm || strlen(opt.user) > MAX_TEXT ||
        strlen(opt.realm) > MAX_TEXT || opt.window < 1 || opt.window > MAX_WINDOW ||
        !(opt.duration > 0 && opt.duration <= 600) || opt.max < 1 || opt.timeout <= 0 ||
        (opt.hold && (opt.n_checkpoints == 0 || opt.peer_port == 0)))
        return usage();
    hmac_init(&mac, opt.key, (size_t)opt.key_len);
    if (getrandom(&rng_state, sizeof rng_state, 0) != sizeof rng_state || rng_state == 0)
        rng_state = 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < MAX_WINDOW; i++)
        slots[i].fd = -1;
    if (!opt.hold) {
        double cpu0 = cpu_seconds(), start = now_s();
        run(start + opt.duration, opt.max, 1);
        double elapsed = now_s() - start;
        double cpu = cpu_seconds() - cpu0;
        printf("{\"allocations\": %lld, \"per_s\": %.1f, \"elapsed\": %.4f, "
               "\"sessions\": %lld, \"requests\": %lld, \"deallocated\": %lld, "
               "\"retransmits\": %lld, \"timeouts\": %lld, \"stale\": %lld, "
               "\"errors\": %lld, \"first_error\": %d, \"refused\": %lld, \"late\": %lld, "
               "\"p50_us\": %.0f, \"p99_us\": %.0f, \"cpu_pct\": %.1f}\n",
               cnt.allocations, cnt.allocations / elapsed, elapsed, cnt.sessions,
               cnt.requests, cnt.deallocated, cnt.retransmits, cnt.timeouts, cnt.stale,
               cnt.errors, cnt.first_error, cnt.refused, cnt.late, lat_quantile(0.5),
               lat_quantile(0.99), 100.0 * cpu / elapsed);
        fflush(stdout); /* the caller reads the server's CPU time now */
        /* Let the sessions in flight finish (their Refresh frees the allocation), briefly. */
        run(now_s() + 1.0, 0, 0);
        for (int i = 0; i < opt.window; i++)
            end_session(&slots[i]);
        return 0;
    }
    held_cap = opt.checkpoints[opt.n_checkpoints - 1];
    held_fds = calloc((size_t)held_cap, sizeof *held_fds);
    if (held_fds == NULL)
        return 1;
    double deadline = now_s() + opt.duration;
    char line[64];
    for (int c = 0; c < opt.n_checkpoints; c++) {
        double cpu0 = cpu_seconds(), start = now_s();
        long long before = cnt.held;
        run(deadline, opt.checkpoints[c], 0);
        for (int i = 0; i < opt.window; i++)
            end_session(&slots[i]); /* only when the deadline cut a leg short */
        double elapsed = now_s() - start;
        printf("{\"held\": %lld, \"per_s\": %.1f, \"elapsed\": %.4f, \"requests\": %lld, "
               "\"retransmits\": %lld, \"timeouts\": %lld, \"errors\": %lld, "
               "\"first_error\": %d, \"refused\": %lld, \"p50_us\": %.0f, \"p99_us\": %.0f, "
               "\"cpu_pct\": %.1f, \"complete\": %s}\n",
               cnt.held, (cnt.held - before) / elapsed, elapsed, cnt.requests,
               cnt.retransmits, cnt.timeouts, cnt.errors, cnt.first_error, cnt.refused,
               lat_quantile(0.5), lat_quantile(0.99),
               100.0 * (cpu_seconds() - cpu0) / elapsed,
               cnt.held >= opt.checkpoints[c] ? "true" : "false");
        fflush(stdout);
        struct pollfd in = {0, POLLIN, 0};
        if (poll(&in, 1, 600 * 1000) <= 0 || !fgets(line, sizeof line, stdin))
            break;
    }
    for (long long i = 0; i < cnt.held && i < held_cap; i++)
        close(held_fds[i]);
    return 0;
}

static int hmac_selftest(const char *key_hex, const char *msg_hex) {
    static uint8_t key[1024], msg[4096];
    int klen = parse_hex(key_hex, key, sizeof key), mlen = parse_hex(msg_hex, msg, sizeof msg);
    if (klen < 0 || mlen < 0)
        return usage();
    struct hmac m;
    uint8_t out[20];
    hmac_init(&m, key, (size_t)klen);
    hmac_sha1(&m, msg, (size_t)mlen, out);
    for (int i = 0; i < 20; i++)
        printf("%02x", out[i]);
    printf("\n");
    return 0;
}

int main(int argc, char **argv) {
    if ((argc == 2 || argc == 3) && !strcmp(argv[1], "sink"))
        return sink(argc == 3 ? argv[2] : "127.0.0.1");
    if (argc == 5 && !strcmp(argv[1], "blast"))
        return blast(atoi(argv[2]), atof(argv[3]), argv[4]);
    if (argc == 4 && !strcmp(argv[1], "hmac"))
        return hmac_selftest(argv[2], argv[3]);
    if (argc >= 4 && (!strcmp(argv[1], "alloc") || !strcmp(argv[1], "hold")))
        return control(argc, argv);
    return usage();
}
