/* What every part of the native data path shares: the Python header (first, as Python
   asks), protocol constants and two small helpers. Each part is its own compilation unit
   with its own header (fastpath.c is the module definition); what a part keeps to itself
   stays static there. */
#ifndef TCPENCAP_NATIVE_COMMON_H
#define TCPENCAP_NATIVE_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

#define PROTO_UDP 17
#define NATT_PORT 4500
#define LENGTH_SIZE 2
#define MAX_FRAME 0xFFFF
#define ESP_MIN_LEN 8
/* The most one injected UDP datagram carries: IPv4's 16-bit total length covers the IP and
   UDP headers, IPv6's payload length the UDP header (core/router.py has the same bounds). */
#define MAX_UDP_PAYLOAD_V4 (0xFFFF - 20 - 8)
#define MAX_UDP_PAYLOAD_V6 (0xFFFF - 8)
#define PREFIX "IKETCP"
#define PREFIX_LEN 6

static inline void
put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* A counter the worker threads bump without the GIL; ADD(x, 0) reads it. */
#define ADD(field, n) __atomic_fetch_add(&(field), (n), __ATOMIC_RELAXED)

#endif
