/* What every libFuzzer target of the native data path shares.

   A target is linked with the extension's compilation units (tcpencap/native/fastpath.c
   and the .c files in its src/, of the checkout or of a mutated copy: fuzz-native.sh
   --src) and sees them through their headers: it calls the parts' C functions and reads
   their structs directly, and calls their Python methods as Python does (fz_call). An
   embedded interpreter, with Python's allocator switched to plain malloc so
   AddressSanitizer sees every object, serves the parts that take or make Python objects.
   Any sanitizer report, and any broken invariant (FUZZ_CHECK aborts), is a finding. */
#include "tcpencap/native/src/common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/netlink.h>

#include "tcpencap/native/src/deframer.h"
#include "tcpencap/native/src/flow_cache.h"
#include "tcpencap/native/src/frame_rate.h"
#include "tcpencap/native/src/inbound_worker.h"
#include "tcpencap/native/src/inject.h"
#include "tcpencap/native/src/queue_batch.h"
#include "tcpencap/native/src/writer.h"

PyMODINIT_FUNC PyInit__fastpath(void); /* fastpath.c: the module, its types readied */

#define FUZZ_CHECK(cond)                                                                     \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "fuzz invariant broken at %s:%d: %s\n", __FILE__, __LINE__,      \
                    #cond);                                                                  \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

/* A Python call that must not fail (it fails only on a harness bug or out of memory). */
#define FUZZ_PY(expr)                                                                        \
    ({                                                                                       \
        PyObject *r_ = (expr);                                                               \
        if (r_ == NULL) {                                                                    \
            PyErr_Print();                                                                   \
            fprintf(stderr, "fuzz: Python call failed at %s:%d: %s\n", __FILE__, __LINE__,   \
                    #expr);                                                                  \
            abort();                                                                         \
        }                                                                                    \
        r_;                                                                                  \
    })

/* A method name as a str made once: a str made per call would be kept by the type's
   attribute cache past the input, and libFuzzer would scan for leaks after every input. */
static PyObject *
fz_name(const char *name)
{
    static const char *keys[32];
    static PyObject *names[32];
    for (int i = 0; i < 32; i++) {
        if (keys[i] == name)
            return names[i];
        if (keys[i] == NULL) {
            names[i] = PyUnicode_InternFromString(name);
            if (names[i] == NULL)
                return NULL;
            keys[i] = name;
            return names[i];
        }
    }
    FUZZ_CHECK(!"more than 32 method names");
    return NULL;
}

/* self.name(*args) (args: a tuple, NULL: no arguments), as Python calls a method. */
static PyObject *
fz_call(void *self, const char *name, PyObject *args)
{
    PyObject *n = fz_name(name);
    if (n == NULL)
        return NULL;
    if (args == NULL)
        return PyObject_CallMethodNoArgs((PyObject *)self, n);
    PyObject *m = PyObject_GetAttr((PyObject *)self, n);
    if (m == NULL)
        return NULL;
    PyObject *r = PyObject_Call(m, args, NULL);
    Py_DECREF(m);
    return r;
}

/* self.name(arg): a method of one argument. */
static PyObject *
fz_call1(void *self, const char *name, PyObject *arg)
{
    PyObject *n = fz_name(name);
    return n == NULL ? NULL : PyObject_CallMethodOneArg((PyObject *)self, n, arg);
}

/* The events bind_events() hands the deframer: four singletons, and classes whose
   instances a target tells apart by type (IKE: bytes, ESP: bytearray, invalid: str,
   protocol error: ValueError). */
static PyObject *fz_need, *fz_keepalive, *fz_prefix, *fz_closed;

static void
fuzz_python_init(void)
{
    if (Py_IsInitialized())
        return;
    PyPreConfig pre;
    PyPreConfig_InitIsolatedConfig(&pre);
    pre.allocator = PYMEM_ALLOCATOR_MALLOC;
    PyStatus st = Py_PreInitialize(&pre);
    if (PyStatus_Exception(st))
        Py_ExitStatusException(st);
    PyConfig cfg;
    PyConfig_InitIsolatedConfig(&cfg);
    cfg.install_signal_handlers = 0;
    st = Py_InitializeFromConfig(&cfg);
    PyConfig_Clear(&cfg);
    if (PyStatus_Exception(st))
        Py_ExitStatusException(st);
    FUZZ_PY(PyInit__fastpath()); /* readies the types; the module stays alive */
    fz_need = FUZZ_PY(PyUnicode_FromString("NeedData"));
    fz_keepalive = FUZZ_PY(PyUnicode_FromString("Keepalive"));
    fz_prefix = FUZZ_PY(PyUnicode_FromString("PrefixReceived"));
    fz_closed = FUZZ_PY(PyUnicode_FromString("ConnectionClosed"));
    PyObject *args = FUZZ_PY(Py_BuildValue("(OOOOOOOOO)", fz_need, fz_keepalive, fz_prefix,
                                           fz_closed, (PyObject *)&PyBytes_Type,
                                           (PyObject *)&PyByteArray_Type,
                                           (PyObject *)&PyUnicode_Type, PyExc_ValueError,
                                           Py_True));
    Py_DECREF(FUZZ_PY(bind_events(NULL, args)));
    Py_DECREF(args);
}

/* The input, consumed from the front; past its end every read gives zeros. */
typedef struct {
    const uint8_t *p;
    size_t n;
} Input;

static int
in_empty(const Input *in)
{
    return in->n == 0;
}

static uint8_t
in_u8(Input *in)
{
    if (in->n == 0)
        return 0;
    in->n--;
    return *in->p++;
}

static uint32_t
in_u16(Input *in)
{
    uint32_t hi = in_u8(in);
    return (hi << 8) | in_u8(in);
}

static uint32_t
in_u32(Input *in)
{
    uint32_t hi = in_u16(in);
    return (hi << 16) | in_u16(in);
}

/* Up to want octets (fewer at the end of the input); *got says how many. */
static const uint8_t *
in_bytes(Input *in, size_t want, size_t *got)
{
    const uint8_t *p = in->p;
    *got = want < in->n ? want : in->n;
    in->p += *got;
    in->n -= *got;
    return p;
}

/* A non-blocking AF_UNIX pair: sv[0] for the code under test, sv[1] for the harness. */
static void
fuzz_socketpair(int type, int sv[2], int sndbuf)
{
    FUZZ_CHECK(socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) == 0);
    for (int i = 0; i < 2; i++)
        FUZZ_CHECK(fcntl(sv[i], F_SETFL, fcntl(sv[i], F_GETFL) | O_NONBLOCK) == 0);
    if (sndbuf > 0)
        setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
}

/* The one's complement sum of 16-bit words, the slow and obvious way (the reference the
   extension's word_sum/fold are checked against). */
static uint32_t
ref_sum(const uint8_t *p, size_t n, uint32_t s)
{
    for (size_t i = 0; i + 1 < n; i += 2)
        s += ((uint32_t)p[i] << 8) | p[i + 1];
    if (n & 1)
        s += (uint32_t)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return s;
}

/* One packet an InjectBatch built from (peer, local, sport, dport, payload): every header
   field and checksum as Router._inject writes them. Lengths are checked only where they
   fit 16 bits (larger frames are refused before they get here, or the kernel refuses the
   packet). */
static void
check_injected(const uint8_t *pkt, size_t len, int v6, const uint8_t *peer,
               const uint8_t *local, uint32_t sport, uint32_t dport, const uint8_t *payload,
               size_t plen)
{
    size_t hlen = v6 ? 48 : 28;
    FUZZ_CHECK(len == hlen + plen);
    FUZZ_CHECK(memcmp(pkt + hlen, payload, plen) == 0);
    if (!v6) {
        FUZZ_CHECK(pkt[0] == 0x45 && pkt[8] == 64 && pkt[9] == PROTO_UDP);
        FUZZ_CHECK(memcmp(pkt + 12, peer, 4) == 0 && memcmp(pkt + 16, local, 4) == 0);
        FUZZ_CHECK((((uint32_t)pkt[20] << 8) | pkt[21]) == (sport & 0xFFFF));
        FUZZ_CHECK((((uint32_t)pkt[22] << 8) | pkt[23]) == (dport & 0xFFFF));
        FUZZ_CHECK(pkt[26] == 0 && pkt[27] == 0);
        if (len <= 0xFFFF) {
            FUZZ_CHECK((((size_t)pkt[2] << 8) | pkt[3]) == len);
            FUZZ_CHECK((((size_t)pkt[24] << 8) | pkt[25]) == len - 20);
            FUZZ_CHECK(ref_sum(pkt, 20, 0) == 0xFFFF);
        }
    } else {
        FUZZ_CHECK(pkt[0] == 0x60 && pkt[1] == 0 && pkt[2] == 0 && pkt[3] == 0);
        FUZZ_CHECK(pkt[6] == PROTO_UDP && pkt[7] == 64);
        FUZZ_CHECK(memcmp(pkt + 8, peer, 16) == 0 && memcmp(pkt + 24, local, 16) == 0);
        FUZZ_CHECK((((uint32_t)pkt[40] << 8) | pkt[41]) == (sport & 0xFFFF));
        FUZZ_CHECK((((uint32_t)pkt[42] << 8) | pkt[43]) == (dport & 0xFFFF));
        size_t ulen = 8 + plen;
        if (ulen <= 0xFFFF) {
            FUZZ_CHECK((((size_t)pkt[4] << 8) | pkt[5]) == ulen);
            FUZZ_CHECK((((size_t)pkt[44] << 8) | pkt[45]) == ulen);
            FUZZ_CHECK(pkt[46] != 0 || pkt[47] != 0); /* 0 means "no checksum" */
            /* pseudo-header + UDP header + payload: a valid checksum sums to 0xFFFF */
            uint32_t s = ref_sum(pkt + 8, 32, 0);
            s = ref_sum((const uint8_t[]){0, 0, (uint8_t)(ulen >> 8), (uint8_t)ulen, 0, 0, 0,
                                          PROTO_UDP},
                        8, s);
            s = ref_sum(pkt + 40, ulen, s);
            FUZZ_CHECK(s == 0xFFFF);
        }
    }
}

/* An ESP-in-UDP packet as charon sends it (from port 4500), its fields from the input in a
   small space so that packets of a round meet the same flows; some are then damaged. Or,
   with bit 7 of the first octet, raw octets. -> its length (at most cap). */
static size_t
esp_packet(Input *in, uint8_t *dst, size_t cap)
{
    uint8_t out[256];
    uint8_t form = in_u8(in);
    size_t n;
    if (form & 0x80) {
        const uint8_t *p = in_bytes(in, in_u8(in), &n);
        n = n < cap ? n : cap;
        memcpy(dst, p, n);
        return n;
    }
    int v6 = form & 1;
    size_t ip = v6 ? 40 : 20;
    size_t plen = 8 + in_u8(in) % 64;
    n = ip + 8 + plen;
    memset(out, 0, n);
    uint8_t host = in_u8(in) % 4, port = in_u8(in) % 3, spi = in_u8(in) % 4;
    if (!v6) {
        out[0] = 0x45;
        put16(out + 2, (uint32_t)n);
        out[8] = 64;
        out[9] = PROTO_UDP;
        out[12] = 198, out[13] = 18, out[14] = 0, out[15] = 1;
        out[16] = 198, out[17] = 19, out[18] = host, out[19] = 2;
    } else {
        out[0] = 0x60;
        put16(out + 4, (uint32_t)(n - 40));
        out[6] = PROTO_UDP;
        out[7] = 64;
        out[8] = 0xfd, out[23] = 1;
        out[24] = 0xfd, out[38] = host, out[39] = 2;
    }
    put16(out + ip, NATT_PORT);
    put16(out + ip + 2, 4500 + 1000u * port);
    put16(out + ip + 4, (uint32_t)(8 + plen));
    out[ip + 8] = (form & 2) ? 0x80 : 0; /* an SPI with its top bit set, or not */
    out[ip + 11] = (uint8_t)(spi + 1);
    for (size_t i = ip + 12; i < n; i++)
        out[i] = (uint8_t)i;
    if (form & 4) { /* one octet damaged, or the packet cut short */
        size_t at = in_u8(in) % n;
        if (form & 8)
            n = at;
        else
            out[at] ^= in_u8(in) | 1;
    }
    n = n < cap ? n : cap; /* cut short by the room there is */
    memcpy(dst, out, n);
    return n;
}

/* The frames of an RFC 9329 send stream, each checked to hold an ESP packet. -> count. */
static Py_ssize_t
check_frames(const uint8_t *p, size_t n)
{
    Py_ssize_t frames = 0;
    while (n) {
        FUZZ_CHECK(n >= LENGTH_SIZE);
        size_t len = ((size_t)p[0] << 8) | p[1];
        FUZZ_CHECK(len >= LENGTH_SIZE + ESP_MIN_LEN && len <= n);
        FUZZ_CHECK(p[2] | p[3] | p[4] | p[5]); /* a non-zero SPI: never the IKE marker */
        p += len;
        n -= len;
        frames++;
    }
    return frames;
}
