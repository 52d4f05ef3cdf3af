/* InboundWorker: the receive side of open connections on a thread of its own. Python lends
   it a connection (socket, deframer, the packet charon must see); it reads, turns ESP
   frames into packets and injects them, without the GIL; keepalives it drops and counts
   itself. At the first other frame (left unread in the deframer), at EOF, an error or over
   the frame rate (frame_rate.h), it gives the connection back and Python's engine goes on
   where the worker stopped. */
#ifndef TCPENCAP_NATIVE_INBOUND_WORKER_H
#define TCPENCAP_NATIVE_INBOUND_WORKER_H

#include <pthread.h>

#include "common.h"
#include "deframer.h"
#include "frame_rate.h"
#include "inject.h"

/* Why a connection goes back to Python (reason_names in inbound_worker.c: its name). */
enum { R_FRAME = 1, R_EOF, R_ERROR, R_RATE, R_NOMEM };

/* A lent connection. */
typedef struct {
    uint32_t conn_id;
    int fd;
    Deframer *d; /* strong reference; d->lent while here */
    uint8_t peer[16], local[16];
    int v6;
    uint32_t sport, dport;
    long max_rate; /* frames per second, 0: no limit */
    RateWindow rate;
    Py_ssize_t frames, bytes, reads, keepalives; /* not yet reported to Python */
    int reason;
} Lent;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu; /* the lent table and every Lent in it */
    int ready;
    int epfd;
    int fd4, fd6;
    Lent **lent;
    size_t nlent, cap;
    Lent **back; /* given back, waiting for Python */
    size_t nback, backcap;
    InjectBatch *batch;
    int stop;
    int running;
    Py_ssize_t injected, failed, wakeups; /* atomic */
    int last_errno;
} InboundWorker;

extern PyTypeObject InboundWorkerType;

/* Read what l's socket has and put its ESP into w->batch, now being the time of this
   wake-up (mono_now()); without the GIL, with w->mu held. -> 0, or the reason (R_*) the
   connection goes back. */
int lent_read(InboundWorker *w, Lent *l, double now);

#endif
