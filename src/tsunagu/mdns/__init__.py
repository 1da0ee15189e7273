"""mdns"""
