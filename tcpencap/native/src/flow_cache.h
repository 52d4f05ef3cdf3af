/* FlowCache: charon's ESP-in-UDP -> the connection Python routed the same (source,
   destination, port, SPI) to. Python installs entries and clears them whenever its table
   or a connection changes; a connection with a TcpWriter gets its hits written in C.
   classify() sorts a batch of packets into misses (for Python) and hits; the NFQUEUE
   batch reader (queue_batch.h) uses the same classify_direct/classify_collect. */
#ifndef TCPENCAP_NATIVE_FLOW_CACHE_H
#define TCPENCAP_NATIVE_FLOW_CACHE_H

#include <pthread.h>

#include "common.h"
#include "writer.h"

typedef struct {
    uint8_t used, v6;
    uint16_t dport;
    uint32_t spi;
    uint8_t src[16], dst[16];
} FlowKey;

typedef struct {
    FlowKey key;
    uint32_t conn_id;
} Flow;

typedef struct {
    uint32_t conn_id; /* 0: empty */
    TcpWriter *writer; /* strong reference, taken and released with the GIL */
} WriterSlot;

/* Flows and writers are read by the queue workers without the GIL (read lock) and changed
   by Python with it (write lock); no thread holding the lock ever waits for the GIL. */
typedef struct {
    PyObject_HEAD
    pthread_rwlock_t lock;
    int ready; /* lock is initialised */
    Flow *flows;
    size_t cap, count;
    WriterSlot *writers;
    size_t wcap, wcount;
    Py_ssize_t hits, misses, refused, direct; /* updated atomically */
    Py_ssize_t seq;  /* of read_queue's verdict messages */
    uint8_t *qbuf;   /* QUEUE_BATCH receive buffers for read_queue() */
} FlowCache;

/* One packet of a batch being classified. */
typedef struct {
    const uint8_t *p; /* NULL: no payload, a miss */
    size_t esp_at, total;
    int slot; /* -1: not a hit */
} Classified;

/* The hits of one connection in a batch. */
typedef struct {
    uint32_t conn_id;
    size_t bytes;
    Py_ssize_t frames;
    int direct; /* written by the connection's writer */
    PyObject *data;
    size_t fill;
} Slot;

extern PyTypeObject FlowCacheType;

/* The key of a packet the cache can hold (Router.outbound's fast path: ESP-in-UDP from
   port 4500, IPv4 without options or fragments, IPv6 without extension headers), and
   where its ESP starts and the packet ends. -> 1, or 0 for any other packet. */
int flow_key(const uint8_t *p, size_t len, FlowKey *k, size_t *esp_at, size_t *total);

/* The writer that takes conn_id's hits, or NULL. With the lock held (either kind). */
TcpWriter *writer_find(FlowCache *c, uint32_t conn_id);

/* Without the GIL: sort n packets into hits (per connection, in arrival order, in slots)
   and misses, and write the hits of connections with a writer; stalled gets the conn ids
   whose writer kept octets the socket did not take. -> 0, or -1 when out of memory. */
int classify_direct(FlowCache *c, Classified *pk, size_t n, Slot *slots, size_t *nslots,
                    uint32_t *stalled, size_t *nstalled);

/* With the GIL: the hits of connections without writer, framed into one bytes each. */
int classify_collect(Classified *pk, size_t n, Slot *slots, size_t nslots);

/* With the GIL: [(conn_id, frames_bytes, frames)] of the collected slots (their bytes move
   into the list), or NULL with an exception. */
PyObject *slots_list(Slot *slots, size_t nslots);

/* With the GIL: what the slots still hold. */
void slots_free(Slot *slots, size_t nslots);

#endif
