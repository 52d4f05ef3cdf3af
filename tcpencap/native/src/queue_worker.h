/* QueueWorker: one NFQUEUE read (queue_batch.h's rounds) on a thread of its own, the GIL
   taken only for what Python must see (misses, stalled writers, a failed verdict). */
#ifndef TCPENCAP_NATIVE_QUEUE_WORKER_H
#define TCPENCAP_NATIVE_QUEUE_WORKER_H

#include "common.h"

extern PyTypeObject QueueWorkerType;

#endif
