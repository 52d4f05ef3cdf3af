/*
 * The per-packet work of the RFC 9329 data path, in C: the module definition. Its parts
 * are compilation units of their own in src/, each with a header (what it is, what other
 * parts may call); setup.py lists them.
 *
 * Python keeps every decision that is not per packet (connections, the SPI table, VICI,
 * timers); these parts only repeat, packet by packet, decisions Python has made:
 *
 *   inject          InjectBatch: the packets charon gets, built as Router._inject builds
 *                   them, sent with one sendmmsg per run of a family.
 *   deframer        Deframer: StreamCodec's events (the reference); pump() turns an open
 *                   connection's ESP frames into packets.
 *   writer          TcpWriter: one connection's send buffer, shared by Python's frames and
 *                   the flow cache's, so both keep their order.
 *   flow_cache      FlowCache: charon's ESP-in-UDP -> the connection Python routed the same
 *                   (source, destination, port, SPI) to; Python installs entries and clears
 *                   them whenever its table or a connection changes.
 *   queue_batch     FlowCache.read_queue(): batched NFQUEUE reads (recvmmsg), classified
 *                   by the flow cache, and the batch verdict.
 *   queue_worker    QueueWorker: queue batches on a thread of its own, without the GIL.
 *   inbound_worker  InboundWorker: open connections read on a thread of their own, ESP
 *                   injected; anything else goes back to Python's engine. frame_rate.h:
 *                   its max_frame_rate rule and clock.
 */
#include "src/common.h"

#include "src/deframer.h"
#include "src/flow_cache.h"
#include "src/inbound_worker.h"
#include "src/inject.h"
#include "src/queue_worker.h"
#include "src/writer.h"

static PyMethodDef module_methods[] = {
    {"bind_events", bind_events, METH_VARARGS,
     "bind_events(NeedData(), Keepalive(), PrefixReceived(), ConnectionClosed(), IKEMessage, "
     "ESPPacket, InvalidFrame, ProtocolError, Role.RESPONDER)"},
    {0},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "The native RFC 9329 data path.",
    .m_size = -1,
    .m_methods = module_methods,
};

/* The one symbol the extension exports (-fvisibility=hidden hides the parts'): Python's
   import calls it, and so do the fuzz targets, to ready the types. */
PyMODINIT_FUNC PyInit__fastpath(void);

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&InjectBatchType) < 0 || PyType_Ready(&DeframerType) < 0 ||
        PyType_Ready(&TcpWriterType) < 0 || PyType_Ready(&FlowCacheType) < 0 ||
        PyType_Ready(&QueueWorkerType) < 0 || PyType_Ready(&InboundWorkerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "InjectBatch", (PyObject *)&InjectBatchType) < 0 ||
        PyModule_AddObjectRef(m, "Deframer", (PyObject *)&DeframerType) < 0 ||
        PyModule_AddObjectRef(m, "FlowCache", (PyObject *)&FlowCacheType) < 0 ||
        PyModule_AddObjectRef(m, "TcpWriter", (PyObject *)&TcpWriterType) < 0 ||
        PyModule_AddObjectRef(m, "QueueWorker", (PyObject *)&QueueWorkerType) < 0 ||
        PyModule_AddObjectRef(m, "InboundWorker", (PyObject *)&InboundWorkerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
