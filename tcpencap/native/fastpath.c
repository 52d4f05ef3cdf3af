/*
 * The per-packet work of the RFC 9329 data path, in C: one extension, its parts in src/.
 *
 * Python keeps every decision that is not per packet (connections, the SPI table, VICI,
 * timers); these parts only repeat, packet by packet, decisions Python has made:
 *
 *   inject.c          InjectBatch: the packets charon gets, built as Router._inject builds
 *                     them, sent with one sendmmsg per run of a family.
 *   deframer.c        Deframer: StreamCodec's events (the reference); pump() turns an open
 *                     connection's ESP frames into packets.
 *   writer.c          TcpWriter: one connection's send buffer, shared by Python's frames
 *                     and the flow cache's, so both keep their order.
 *   flows.c           FlowCache: charon's ESP-in-UDP -> the connection Python routed the
 *                     same (source, destination, port, SPI) to; Python installs entries and
 *                     clears them whenever its table or a connection changes. Batched
 *                     NFQUEUE reads (recvmmsg) and the batch verdict.
 *   queue_worker.c    QueueWorker: one queue read on a thread of its own, without the GIL.
 *   inbound_worker.c  InboundWorker: open connections read on a thread of their own, ESP
 *                     injected; anything else goes back to Python's engine.
 */
#include "src/common.h"

#include "src/inject.c"
#include "src/deframer.c"
#include "src/writer.c"
#include "src/flows.c"
#include "src/queue_worker.c"
#include "src/inbound_worker.c"

/* ------------------------------------------------------------------------------------ */

static PyMethodDef module_methods[] = {
    {"bind_events", bind_events, METH_VARARGS,
     "bind_events(NeedData(), Keepalive(), PrefixReceived(), ConnectionClosed(), IKEMessage, "
     "ESPPacket, InvalidFrame, ProtocolError, Role.RESPONDER)"},
    {NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "The native RFC 9329 data path.",
    .m_size = -1,
    .m_methods = module_methods,
};

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
