/* TcpWriter: the send side of one RFC 9329 connection. Python's frames (IKE, misses) and
   the flow cache's hits share one buffer, so they leave in the order they were written.
   The queue workers write without the GIL, so every access holds the writer's mutex. */
#ifndef TCPENCAP_NATIVE_WRITER_H
#define TCPENCAP_NATIVE_WRITER_H

#include <pthread.h>

#include "common.h"

/* The IKE factor when the caller gives none: IKE may queue up to limit * this. The one
   value is tcpencap's (aio/tcp.py's IKE_HARD_LIMIT_FACTOR), handed in as ike_factor. */
#define IKE_FACTOR_DEFAULT 4

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    int ready; /* mu is initialised */
    int fd;    /* -1: detached, or collecting for take() when collect is set */
    int collect;
    size_t limit;     /* ESP is dropped while more than this is queued */
    size_t ike_limit; /* IKE only while more than this (limit * ike_factor) is */
    uint8_t *buf;
    size_t len, cap, pos;
    Py_ssize_t direct_frames, direct_bytes; /* written by the flow cache, not by Python */
    Py_ssize_t esp_dropped, ike_dropped;
    int error; /* errno of a failed send: the connection is broken, writes are dropped */
} TcpWriter;

extern PyTypeObject TcpWriterType;

/* The functions below are called with w->mu held and without the GIL. */

/* Room for n more octets at w->buf + w->len. -> 0, or -1 out of memory. */
int writer_room(TcpWriter *w, size_t n);

/* May a frame (IKE, or ESP counting frames) be queued? Counts what it drops. -> 1 or 0. */
int writer_admit(TcpWriter *w, int is_ike, Py_ssize_t frames);

/* Send what the socket takes now; an idle or broken writer keeps no buffer. */
void writer_flush(TcpWriter *w);

#endif
