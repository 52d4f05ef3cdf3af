/* InjectBatch: the packets charon gets (IP and UDP headers, checksums, as Router._inject
   builds them), sent with one sendmmsg per run of an address family. The deframer's pump()
   and the inbound worker fill a batch; the worker sends it without the GIL. */
#ifndef TCPENCAP_NATIVE_INJECT_H
#define TCPENCAP_NATIVE_INJECT_H

#include "common.h"

typedef struct {
    size_t off, len;
    uint8_t v6;
} Pending;

typedef struct {
    PyObject_HEAD
    uint8_t *buf;
    size_t len, cap;
    Pending *pk;
    size_t n, pcap;
    Py_ssize_t sent, failed; /* totals over the batch's life */
    int last_errno;
} InjectBatch;

extern PyTypeObject InjectBatchType;

/* The packet source = peer, destination = local, with the payload; no Python objects, so
   callable without the GIL. -> 0, or -1 out of memory. */
int batch_add(InjectBatch *b, const uint8_t *peer, const uint8_t *local, int v6,
              uint32_t sport, uint32_t dport, const uint8_t *payload, size_t plen);

/* Every packet to its own destination address through the raw sockets fd4/fd6; the batch
   is emptied. Without the GIL. */
void batch_send(InjectBatch *b, int fd4, int fd6, Py_ssize_t *sent_out, Py_ssize_t *failed_out);

/* The (peer, local) address pair of an inject template: both IPv4 or both IPv6 bytes.
   With the GIL. -> 0 with *v6 set, or -1 with an exception. */
int addr_pair(PyObject *peer_o, PyObject *local_o, const uint8_t **peer, const uint8_t **local,
              int *v6);

#endif
