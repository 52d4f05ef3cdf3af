/* NFQUEUE batches: one recvmmsg of up to QUEUE_BATCH queued packets from the queue's
   netlink socket, parsed, classified against the flow cache (hits written by their
   connection's writer), then one NF_DROP verdict for the batch. FlowCache.read_queue() is
   one round with the GIL released around it; the QueueWorker runs rounds on its thread. */
#ifndef TCPENCAP_NATIVE_QUEUE_BATCH_H
#define TCPENCAP_NATIVE_QUEUE_BATCH_H

#include "common.h"
#include "flow_cache.h"

#define QUEUE_BATCH 64
#define QUEUE_BUF (65536 + 1024) /* one datagram: a packet and its netlink attributes */

/* nfnetlink_queue's message and attribute types (linux/netfilter/nfnetlink_queue.h). */
#define NFNL_SUBSYS_QUEUE 3
#define NFQNL_MSG_PACKET 0
#define NFQA_PACKET_HDR 1
#define NFQA_PAYLOAD 10
#define NLA_TYPE_MASK_ ((uint16_t)~((1 << 15) | (1 << 14)))

/* One read of the queue: what queue_round found, for round_result or the worker. */
typedef struct {
    int r;          /* messages read, or -1 with err */
    int err;
    long overruns;
    long long last_id;
    size_t n;       /* packets among them */
    Classified pk[QUEUE_BATCH];
    Slot slots[QUEUE_BATCH];
    size_t nslots;
    uint32_t stalled[QUEUE_BATCH];
    size_t nstalled;
    int verdict_errno;
    int nomem;
} Round;

/* One queued packet out of a netlink datagram: its id and payload (NULL: none).
   -> 1, or 0 when the datagram holds no packet. */
int nfq_packet(const uint8_t *d, size_t len, uint32_t *id, const uint8_t **payload,
               size_t *plen);

/* Without the GIL: recvmmsg into qbuf (QUEUE_BATCH * QUEUE_BUF octets), classify, write,
   and with queue_num >= 0 the batch verdict after the writes. */
void queue_round(FlowCache *c, int fd, int queue_num, uint8_t *qbuf, uint32_t seq, int flags,
                 Round *rd);

/* With the GIL: the round as read_queue()'s tuple, or NULL with an exception. */
PyObject *round_result(Round *rd);

/* FlowCache.read_queue(fd, queue_num=-1): the method, listed in FlowCache's type. */
PyObject *FlowCache_read_queue(FlowCache *c, PyObject *args);

#endif
