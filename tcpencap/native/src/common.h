/* What every part of the native data path shares: headers, protocol constants, helpers.
   The parts are compiled as one unit (fastpath.c includes them in order), so their
   helpers stay static. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <linux/netlink.h>

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

#define ADD(field, n) __atomic_fetch_add(&(field), (n), __ATOMIC_RELAXED)
