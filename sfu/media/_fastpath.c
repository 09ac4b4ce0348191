/*
 * Blindfold's native fan-out core: the per-packet loop of sfu/media/router.py, in C.
 *
 * What it does, per batch of datagrams read with one recvmmsg():
 *   - an SRTP packet from a known address, for a producer whose route needs no attention:
 *     unprotect it once, then for each ready copy write the rewritten RTP header (SSRC,
 *     sequence number, timestamp, payload type, extension ids) followed by the unchanged
 *     payload into that copy's send slot, srtp_protect it, and queue it; the queue leaves
 *     with one sendmmsg() per batch. The decrypted packet goes back to Python as an event
 *     for the producer's bookkeeping (packet ring, NACK generator, envelope judgement,
 *     transport-cc arrivals, counters).
 *   - anything else (STUN, DTLS, RTCP, unknown addresses or SSRCs, SRTP failures, routes
 *     that need attention): handed back to Python as is, and the batch stops there, so that
 *     Python's state changes take effect before the next datagram is looked at.
 *
 * What it never does: write inside the payload region of a packet (every copy's payload is
 * a memcpy of the decrypted input, compared again on sampled copies), hold a key (libsrtp
 * contexts belong to pylibsrtp sessions the Python side owns and keeps alive), or parse
 * anything past the RTP header and its extension block.
 *
 * libsrtp is pylibsrtp's own copy: Python passes the addresses of srtp_protect and
 * srtp_unprotect from pylibsrtp's cffi library and each session's srtp_t, so both paths
 * share one context per direction (one replay window, one rollover counter) and the Python
 * code can keep protecting retransmissions and RTCP on the same sessions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define RECV_BATCH 32
#define RECV_SLOT 2048
#define SEND_BATCH 256
#define SEND_SLOT 1664
/* pylibsrtp's buffer is 1500 bytes and protect may add up to 144 (SRTP_MAX_TRAILER_LEN);
 * the Python path refuses larger packets, and so does this one, so both behave alike. */
#define MAX_PROTECT_SIZE (1500 - 144)
#define MAX_LATENCY_SAMPLES 4096
#define LATENCY_SAMPLE_EVERY 64
/* Stamped packets a subscriber's Peer remembers (sfu/media/twcc.py LOG_SLOTS). */
#define TWCC_LOG_SLOTS 8192
#define TWCC_LOG_MASK (TWCC_LOG_SLOTS - 1)

typedef int (*srtp_fn)(void *ctx, void *hdr, int *len);

/* ------------------------------------------------------------------------------------- */
/* RTP header (RFC 3550 5.1, A.1), as sfu/media/rtp.py:parse_header reads it.             */

typedef struct {
    uint16_t seq;
    uint32_t ts;
    uint32_t ssrc;
    int header_len;
    int payload_end;
    int ext_profile; /* -1: no extension block */
    int ext_start;
    int ext_end;
} rtp_header;

static int parse_rtp(const uint8_t *d, int size, rtp_header *h)
{
    if (size < 12 || (d[0] >> 6) != 2)
        return 0;
    int pos = 12 + ((d[0] & 0x0F) << 2);
    h->seq = (uint16_t)(d[2] << 8 | d[3]);
    h->ts = (uint32_t)d[4] << 24 | (uint32_t)d[5] << 16 | (uint32_t)d[6] << 8 | d[7];
    h->ssrc = (uint32_t)d[8] << 24 | (uint32_t)d[9] << 16 | (uint32_t)d[10] << 8 | d[11];
    h->ext_profile = -1;
    h->ext_start = h->ext_end = 0;
    if (d[0] & 0x10) {
        if (size < pos + 4)
            return 0;
        h->ext_profile = d[pos] << 8 | d[pos + 1];
        int words = d[pos + 2] << 8 | d[pos + 3];
        h->ext_start = pos + 4;
        pos = h->ext_end = h->ext_start + (words << 2);
    }
    if (pos > size)
        return 0;
    int end = size;
    if (d[0] & 0x20) {
        int pad = d[size - 1];
        if (pad == 0 || pad > size - pos)
            return 0;
        end -= pad;
    }
    h->header_len = pos;
    h->payload_end = end;
    return 1;
}

/* Extension ids translated in place, as sfu/media/rtp.py:remap_extension_ids does: an
 * element mapped to 0 is overwritten with 0x00 padding bytes (RFC 8285 4.1), so no byte
 * moves and the payload offset stays. Returns 0 when a target id does not fit the form. */
static int remap_ids(uint8_t *buf, const rtp_header *h, const uint8_t *map)
{
    int pos = h->ext_start, end = h->ext_end;
    if (h->ext_profile == 0xBEDE) {
        while (pos < end) {
            uint8_t b = buf[pos];
            if (b == 0) {
                pos++;
                continue;
            }
            int id = b >> 4;
            int stop = pos + 1 + (b & 0x0F) + 1;
            if (id == 0 || id == 15 || stop > end) {
                memset(buf + pos, 0, (size_t)(end - pos));
                return 1;
            }
            int target = map[id];
            if (target == 0)
                memset(buf + pos, 0, (size_t)(stop - pos));
            else if (target != id) {
                if (target > 14)
                    return 0;
                buf[pos] = (uint8_t)(target << 4 | (b & 0x0F));
            }
            pos = stop;
        }
    } else if ((h->ext_profile & 0xFFF0) == 0x1000) {
        while (pos < end) {
            int id = buf[pos];
            if (id == 0) {
                pos++;
                continue;
            }
            int stop = pos + 2;
            if (stop <= end)
                stop += buf[pos + 1];
            if (stop > end) {
                memset(buf + pos, 0, (size_t)(end - pos));
                return 1;
            }
            int target = map[id];
            if (target == 0)
                memset(buf + pos, 0, (size_t)(stop - pos));
            else if (target != id)
                buf[pos] = (uint8_t)target;
            pos = stop;
        }
    }
    return 1;
}

static double monotonic_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Offset of the 2-byte value of the first extension element with `ext_id`, or -1: read
 * exactly as sfu/media/twcc.py:transport_seq_slot reads it (the parity test holds both to
 * the same bytes). */
static int twcc_slot(const uint8_t *d, int size, int ext_id)
{
    if (size < 12 || !(d[0] & 0x10))
        return -1;
    int pos = 12 + 4 * (d[0] & 0x0F);
    if (pos + 4 > size)
        return -1;
    int profile = d[pos] << 8 | d[pos + 1];
    int end = pos + 4 + 4 * (d[pos + 2] << 8 | d[pos + 3]);
    if (end > size)
        return -1;
    pos += 4;
    if (profile == 0xBEDE) {
        while (pos < end) {
            uint8_t b = d[pos];
            if (b == 0) {
                pos++;
                continue;
            }
            int found = b >> 4;
            if (found == 0 || found == 15)
                return -1;
            int length = (b & 0x0F) + 1;
            if (pos + 1 + length > end)
                return -1;
            if (found == ext_id)
                return length == 2 ? pos + 1 : -1;
            pos += 1 + length;
        }
    } else if ((profile & 0xFFF0) == 0x1000) {
        while (pos < end) {
            int found = d[pos];
            if (found == 0) {
                pos++;
                continue;
            }
            if (pos + 2 > end)
                return -1;
            int length = d[pos + 1];
            if (pos + 2 + length > end)
                return -1;
            if (found == ext_id)
                return length == 2 ? pos + 2 : -1;
            pos += 2 + length;
        }
    }
    return -1;
}

/* ------------------------------------------------------------------------------------- */
/* Peer: one client transport as the core sees it.                                       */

typedef struct {
    PyObject_HEAD
    PyObject *owner;     /* the Transport (None once closed) */
    PyObject *keepalive; /* the SrtpSession whose libsrtp contexts we borrow */
    PyObject *routes;    /* dict: inbound SSRC -> Route */
    void *rx;            /* srtp_t for what the client sends */
    void *tx;            /* srtp_t for what we send it */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int python_only; /* a test tap wants every packet through Python */
    uint32_t cached_ssrc;
    PyObject *cached_route; /* borrowed from routes */
    /* Transport-wide numbers toward this subscriber (sfu/media/twcc.py SendLog): the
     * extension id (0: not negotiated), numbers handed out, and their log. */
    int twcc_id;
    unsigned long long twcc_stamped;
    struct twcc_entry {
        double at;
        uint32_t ssrc;
        uint16_t seq;
        uint16_t size;
    } *twcc_log;
} Peer;

static PyTypeObject PeerType;

static int Peer_init(Peer *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"owner", NULL};
    PyObject *owner = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &owner))
        return -1;
    Py_INCREF(owner);
    Py_XSETREF(self->owner, owner);
    Py_XSETREF(self->routes, PyDict_New());
    if (self->routes == NULL)
        return -1;
    Py_INCREF(Py_None);
    Py_XSETREF(self->keepalive, Py_None);
    self->rx = self->tx = NULL;
    self->addrlen = 0;
    self->cached_route = NULL;
    return 0;
}

static int Peer_traverse(Peer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->keepalive);
    Py_VISIT(self->routes);
    return 0;
}

static int Peer_clear(Peer *self)
{
    self->cached_route = NULL;
    Py_CLEAR(self->owner);
    Py_CLEAR(self->keepalive);
    Py_CLEAR(self->routes);
    self->rx = self->tx = NULL;
    return 0;
}

static void Peer_dealloc(Peer *self)
{
    PyObject_GC_UnTrack(self);
    Peer_clear(self);
    PyMem_Free(self->twcc_log);
    self->twcc_log = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int fill_sockaddr(const char *host, int port, struct sockaddr_storage *out, socklen_t *len)
{
    memset(out, 0, sizeof(*out));
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    if (port < 0 || port > 65535)
        return 0;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof(*v4);
        return 1;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*v6);
        return 1;
    }
    return 0;
}

static PyObject *Peer_set_address(Peer *self, PyObject *args)
{
    PyObject *addr;
    if (!PyArg_ParseTuple(args, "O", &addr))
        return NULL;
    if (addr == Py_None) {
        self->addrlen = 0;
        Py_RETURN_NONE;
    }
    const char *host;
    int port;
    PyObject *head = PySequence_GetSlice(addr, 0, 2);
    if (head == NULL)
        return NULL;
    int ok = PyArg_ParseTuple(head, "si", &host, &port);
    if (ok && !fill_sockaddr(host, port, &self->addr, &self->addrlen)) {
        PyErr_Format(PyExc_ValueError, "not a numeric IP address and port: %R", addr);
        ok = 0;
    }
    Py_DECREF(head);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Peer_set_srtp(Peer *self, PyObject *args)
{
    unsigned long long rx, tx;
    PyObject *keepalive;
    if (!PyArg_ParseTuple(args, "KKO", &rx, &tx, &keepalive))
        return NULL;
    self->rx = (void *)(uintptr_t)rx;
    self->tx = (void *)(uintptr_t)tx;
    Py_INCREF(keepalive);
    Py_XSETREF(self->keepalive, keepalive);
    Py_RETURN_NONE;
}

static PyObject *Peer_set_routes(Peer *self, PyObject *args)
{
    PyObject *routes;
    if (!PyArg_ParseTuple(args, "O!", &PyDict_Type, &routes))
        return NULL;
    PyObject *copy = PyDict_Copy(routes);
    if (copy == NULL)
        return NULL;
    self->cached_route = NULL;
    Py_XSETREF(self->routes, copy);
    Py_RETURN_NONE;
}

static PyObject *Peer_close(Peer *self, PyObject *Py_UNUSED(ignored))
{
    self->cached_route = NULL;
    PyDict_Clear(self->routes);
    self->rx = self->tx = NULL;
    self->addrlen = 0;
    Py_INCREF(Py_None);
    Py_XSETREF(self->keepalive, Py_None);
    Py_INCREF(Py_None);
    Py_XSETREF(self->owner, Py_None);
    Py_RETURN_NONE;
}

/* The number `ssrc`/`seq` went out with, if the log still has it, else -1. A key is
 * logged at most once while it is in the ring, so the first match is the only one. */
static long twcc_find(const Peer *p, uint32_t ssrc, uint16_t seq)
{
    unsigned long long n = p->twcc_stamped;
    unsigned long long kept = n < TWCC_LOG_SLOTS ? n : TWCC_LOG_SLOTS;
    for (unsigned long long k = 1; k <= kept; k++) {
        const struct twcc_entry *e = &p->twcc_log[(n - k) & TWCC_LOG_MASK];
        if (e->ssrc == ssrc && e->seq == seq)
            return (long)((n - k) & 0xFFFF);
    }
    return -1;
}

/* SendLog.stamp: the next number (or, for a packet not newer than its stream's last, the
 * number it went out with) into the packet's slot. Returns the number or -1. */
static long twcc_stamp(Peer *p, uint8_t *buf, int len, double now, int newer)
{
    int at = p->twcc_id ? twcc_slot(buf, len, p->twcc_id) : -1;
    if (at < 0 || p->twcc_log == NULL)
        return -1;
    uint32_t ssrc = (uint32_t)buf[8] << 24 | (uint32_t)buf[9] << 16 | (uint32_t)buf[10] << 8 | buf[11];
    uint16_t seq = (uint16_t)(buf[2] << 8 | buf[3]);
    long number = newer ? -1 : twcc_find(p, ssrc, seq);
    if (number < 0) {
        struct twcc_entry *e = &p->twcc_log[p->twcc_stamped & TWCC_LOG_MASK];
        e->at = now;
        e->ssrc = ssrc;
        e->seq = seq;
        e->size = (uint16_t)(len < 0xFFFF ? len : 0xFFFF);
        number = (long)(p->twcc_stamped & 0xFFFF);
        p->twcc_stamped++;
    }
    buf[at] = (uint8_t)(number >> 8);
    buf[at + 1] = (uint8_t)number;
    return number;
}

static PyObject *Peer_enable_twcc(Peer *self, PyObject *args)
{
    int ext_id;
    if (!PyArg_ParseTuple(args, "i", &ext_id))
        return NULL;
    if (ext_id < 1 || ext_id > 255) {
        PyErr_Format(PyExc_ValueError, "extension id %d is outside 1-255", ext_id);
        return NULL;
    }
    if (self->twcc_log == NULL) {
        self->twcc_log = PyMem_Calloc(TWCC_LOG_SLOTS, sizeof(struct twcc_entry));
        if (self->twcc_log == NULL)
            return PyErr_NoMemory();
    }
    self->twcc_id = ext_id;
    Py_RETURN_NONE;
}

static PyObject *Peer_stamp(Peer *self, PyObject *args)
{
    Py_buffer buf;
    double now;
    int newer;
    if (!PyArg_ParseTuple(args, "w*dp", &buf, &now, &newer))
        return NULL;
    long number = twcc_stamp(self, buf.buf, (int)buf.len, now, newer);
    PyBuffer_Release(&buf);
    return PyLong_FromLong(number);
}

static PyObject *Peer_sent(Peer *self, PyObject *args)
{
    int base, count;
    if (!PyArg_ParseTuple(args, "ii", &base, &count))
        return NULL;
    PyObject *out = PyList_New(count < 0 ? 0 : count);
    if (out == NULL)
        return NULL;
    long long newest = (long long)self->twcc_stamped - 1;
    for (int i = 0; i < count; i++) {
        long long back = (newest - ((base + i) & 0xFFFF)) & 0xFFFF;
        PyObject *item;
        if (self->twcc_log == NULL || back > newest || back >= TWCC_LOG_SLOTS) {
            item = Py_None;
            Py_INCREF(item);
        } else {
            const struct twcc_entry *e = &self->twcc_log[(newest - back) & TWCC_LOG_MASK];
            item = Py_BuildValue("(di)", e->at, (int)e->size);
            if (item == NULL) {
                Py_DECREF(out);
                return NULL;
            }
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static PyMethodDef Peer_methods[] = {
    {"enable_twcc", (PyCFunction)Peer_enable_twcc, METH_VARARGS,
     "enable_twcc(ext_id): stamp transport-wide numbers into that extension's slot."},
    {"stamp", (PyCFunction)Peer_stamp, METH_VARARGS,
     "stamp(packet: bytearray, now, newer) -> number written, or -1 without a slot."},
    {"sent", (PyCFunction)Peer_sent, METH_VARARGS,
     "sent(base_seq, count) -> [(send time, size) or None] per number."},
    {"set_address", (PyCFunction)Peer_set_address, METH_VARARGS,
     "Where copies to this client go: (host, port[, ...]) or None."},
    {"set_srtp", (PyCFunction)Peer_set_srtp, METH_VARARGS,
     "set_srtp(rx_ctx, tx_ctx, keepalive): borrow the transport's libsrtp contexts."},
    {"set_routes", (PyCFunction)Peer_set_routes, METH_VARARGS,
     "set_routes({ssrc: Route}): which producer each inbound SSRC feeds."},
    {"close", (PyCFunction)Peer_close, METH_NOARGS, "Forget routes, contexts and owner."},
    {NULL}};

static PyMemberDef Peer_members[] = {
    {"owner", T_OBJECT_EX, offsetof(Peer, owner), 0, "the Transport"},
    {"python_only", T_INT, offsetof(Peer, python_only), 0, "hand every packet to Python"},
    {"twcc_ext_id", T_INT, offsetof(Peer, twcc_id), READONLY,
     "transport-cc extension id toward this client (0: none)"},
    {"twcc_stamped", T_ULONGLONG, offsetof(Peer, twcc_stamped), READONLY,
     "transport-wide numbers handed out"},
    {NULL}};

static PyTypeObject PeerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sfu.media._fastpath.Peer",
    .tp_basicsize = sizeof(Peer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One client transport: address, borrowed SRTP contexts, inbound routes.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Peer_init,
    .tp_dealloc = (destructor)Peer_dealloc,
    .tp_traverse = (traverseproc)Peer_traverse,
    .tp_clear = (inquiry)Peer_clear,
    .tp_methods = Peer_methods,
    .tp_members = Peer_members,
};

/* ------------------------------------------------------------------------------------- */
/* Copy: the compact per-copy record (the same fields as router.Copy).                   */

typedef struct {
    PyObject_HEAD
    PyObject *sink;  /* the subscriber's Transport (for the Python paths) */
    PyObject *peer;  /* its Peer */
    PyObject *owner; /* the DownTrack */
    PyObject *ext_map_list;
    uint32_t ssrc;
    uint32_t ts_offset;
    uint32_t last_ts;
    uint16_t seq_offset;
    uint16_t last_seq;
    uint8_t payload_type;
    uint8_t identity_ext;
    uint8_t ext_map[256];
    double last_at;
    unsigned long long packets;
    unsigned long long payload_octets;
} Copy;

static PyTypeObject CopyType;

static int load_ext_map(Copy *self, PyObject *list)
{
    PyObject *seq = PySequence_Fast(list, "ext_map must be a sequence of ints");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    memset(self->ext_map, 0, sizeof(self->ext_map));
    for (Py_ssize_t i = 0; i < n && i < 256; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        /* Above 255 cannot be written in either form: treated as "drop", which the
         * control plane never produces (negotiation keeps ids in 1-255). */
        self->ext_map[i] = (v > 0 && v <= 255) ? (uint8_t)v : 0;
    }
    Py_DECREF(seq);
    Py_INCREF(list);
    Py_XSETREF(self->ext_map_list, list);
    return 0;
}

static int Copy_init(Copy *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"peer",         "sink",     "ssrc",    "payload_type", "ext_map",
                             "identity_ext", "last_seq", "last_ts", NULL};
    PyObject *peer, *sink, *ext_map;
    unsigned long ssrc, last_ts;
    int payload_type, identity, last_seq;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OkiOpik", kwlist, &PeerType, &peer, &sink,
                                     &ssrc, &payload_type, &ext_map, &identity, &last_seq,
                                     &last_ts))
        return -1;
    if (payload_type < 0 || payload_type > 127) {
        PyErr_Format(PyExc_ValueError, "payload type %d is outside 0-127", payload_type);
        return -1;
    }
    Py_INCREF(peer);
    Py_XSETREF(self->peer, peer);
    Py_INCREF(sink);
    Py_XSETREF(self->sink, sink);
    Py_INCREF(Py_None);
    Py_XSETREF(self->owner, Py_None);
    self->ssrc = (uint32_t)ssrc;
    self->payload_type = (uint8_t)payload_type;
    self->identity_ext = (uint8_t)identity;
    self->last_seq = (uint16_t)last_seq;
    self->last_ts = (uint32_t)last_ts;
    self->seq_offset = 0;
    self->ts_offset = 0;
    self->last_at = 0.0;
    self->packets = self->payload_octets = 0;
    return load_ext_map(self, ext_map);
}

static int Copy_traverse(Copy *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sink);
    Py_VISIT(self->peer);
    Py_VISIT(self->owner);
    Py_VISIT(self->ext_map_list);
    return 0;
}

static int Copy_clear(Copy *self)
{
    Py_CLEAR(self->sink);
    Py_CLEAR(self->peer);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->ext_map_list);
    return 0;
}

static void Copy_dealloc(Copy *self)
{
    PyObject_GC_UnTrack(self);
    Copy_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Copy_set_ext_map(Copy *self, PyObject *args)
{
    PyObject *list;
    int identity;
    if (!PyArg_ParseTuple(args, "Op", &list, &identity))
        return NULL;
    if (load_ext_map(self, list) < 0)
        return NULL;
    self->identity_ext = (uint8_t)identity;
    Py_RETURN_NONE;
}

#define U32_FIELD(name)                                                                        \
    static PyObject *Copy_get_##name(Copy *self, void *c)                                      \
    {                                                                                          \
        return PyLong_FromUnsignedLong(self->name);                                            \
    }                                                                                          \
    static int Copy_set_##name(Copy *self, PyObject *v, void *c)                               \
    {                                                                                          \
        if (v == NULL) {                                                                       \
            PyErr_SetString(PyExc_AttributeError, "cannot delete");                            \
            return -1;                                                                         \
        }                                                                                      \
        unsigned long x = PyLong_AsUnsignedLongMask(v);                                        \
        if (x == (unsigned long)-1 && PyErr_Occurred())                                        \
            return -1;                                                                         \
        self->name = (__typeof__(self->name))x;                                                \
        return 0;                                                                              \
    }

U32_FIELD(seq_offset)
U32_FIELD(ts_offset)
U32_FIELD(last_seq)
U32_FIELD(last_ts)

static PyObject *Copy_get_ssrc(Copy *self, void *c) { return PyLong_FromUnsignedLong(self->ssrc); }
static PyObject *Copy_get_payload_type(Copy *self, void *c)
{
    return PyLong_FromLong(self->payload_type);
}
static PyObject *Copy_get_identity_ext(Copy *self, void *c)
{
    return PyBool_FromLong(self->identity_ext);
}
static PyObject *Copy_get_ext_map(Copy *self, void *c)
{
    Py_INCREF(self->ext_map_list);
    return self->ext_map_list;
}

static PyGetSetDef Copy_getset[] = {
    {"ssrc", (getter)Copy_get_ssrc, NULL, "the subscriber-side SSRC", NULL},
    {"payload_type", (getter)Copy_get_payload_type, NULL, "the subscriber's PT", NULL},
    {"identity_ext", (getter)Copy_get_identity_ext, NULL, "extension block kept as is", NULL},
    {"ext_map", (getter)Copy_get_ext_map, NULL, "publisher id -> subscriber id", NULL},
    {"seq_offset", (getter)Copy_get_seq_offset, (setter)Copy_set_seq_offset, NULL, NULL},
    {"ts_offset", (getter)Copy_get_ts_offset, (setter)Copy_set_ts_offset, NULL, NULL},
    {"last_seq", (getter)Copy_get_last_seq, (setter)Copy_set_last_seq, NULL, NULL},
    {"last_ts", (getter)Copy_get_last_ts, (setter)Copy_set_last_ts, NULL, NULL},
    {NULL}};

static PyMemberDef Copy_members[] = {
    {"sink", T_OBJECT_EX, offsetof(Copy, sink), READONLY, "the subscriber's transport"},
    {"owner", T_OBJECT_EX, offsetof(Copy, owner), 0, "the DownTrack"},
    {"last_at", T_DOUBLE, offsetof(Copy, last_at), 0, "arrival time of the last packet sent"},
    {"packets", T_ULONGLONG, offsetof(Copy, packets), 0, "packets sent"},
    {"payload_octets", T_ULONGLONG, offsetof(Copy, payload_octets), 0, "payload bytes sent"},
    {NULL}};

static PyMethodDef Copy_methods[] = {
    {"set_ext_map", (PyCFunction)Copy_set_ext_map, METH_VARARGS,
     "set_ext_map(table, identity): a new extension-id map."},
    {NULL}};

static PyTypeObject CopyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sfu.media._fastpath.Copy",
    .tp_basicsize = sizeof(Copy),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One subscriber's outgoing stream of one producer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Copy_init,
    .tp_dealloc = (destructor)Copy_dealloc,
    .tp_traverse = (traverseproc)Copy_traverse,
    .tp_clear = (inquiry)Copy_clear,
    .tp_members = Copy_members,
    .tp_getset = Copy_getset,
    .tp_methods = Copy_methods,
};

/* ------------------------------------------------------------------------------------- */
/* Route: one producer's ready copies.                                                   */

typedef struct {
    PyObject_HEAD
    PyObject *owner;  /* the Producer */
    PyObject *copies; /* list of Copy */
    int attention;
    int kind; /* 0 audio, 1 video */
} Route;

static PyTypeObject RouteType;

static int Route_init(Route *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", NULL};
    const char *kind;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s", kwlist, &kind))
        return -1;
    if (strcmp(kind, "audio") == 0)
        self->kind = 0;
    else if (strcmp(kind, "video") == 0)
        self->kind = 1;
    else {
        PyErr_Format(PyExc_ValueError, "kind must be audio or video, not %s", kind);
        return -1;
    }
    Py_XSETREF(self->copies, PyList_New(0));
    if (self->copies == NULL)
        return -1;
    Py_INCREF(Py_None);
    Py_XSETREF(self->owner, Py_None);
    self->attention = 0;
    return 0;
}

static int Route_traverse(Route *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->copies);
    return 0;
}

static int Route_clear_refs(Route *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->copies);
    return 0;
}

static void Route_dealloc(Route *self)
{
    PyObject_GC_UnTrack(self);
    Route_clear_refs(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t route_index(Route *self, PyObject *copy)
{
    Py_ssize_t n = PyList_GET_SIZE(self->copies);
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyList_GET_ITEM(self->copies, i) == copy)
            return i;
    return -1;
}

static PyObject *Route_add(Route *self, PyObject *copy)
{
    if (!PyObject_TypeCheck(copy, &CopyType)) {
        PyErr_SetString(PyExc_TypeError, "Route.add takes a Copy");
        return NULL;
    }
    if (route_index(self, copy) < 0 && PyList_Append(self->copies, copy) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Route_remove(Route *self, PyObject *copy)
{
    Py_ssize_t i = route_index(self, copy);
    if (i >= 0 && PySequence_DelItem(self->copies, i) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Route_clear(Route *self, PyObject *Py_UNUSED(ignored))
{
    if (PyList_SetSlice(self->copies, 0, PyList_GET_SIZE(self->copies), NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Route_get_copies(Route *self, void *c) { return PyList_AsTuple(self->copies); }
static PyObject *Route_get_kind(Route *self, void *c)
{
    return PyUnicode_FromString(self->kind ? "video" : "audio");
}
static PyObject *Route_get_attention(Route *self, void *c)
{
    return PyBool_FromLong(self->attention);
}
static int Route_set_attention(Route *self, PyObject *v, void *c)
{
    int truth = v == NULL ? 0 : PyObject_IsTrue(v);
    if (truth < 0)
        return -1;
    self->attention = truth;
    return 0;
}

static PyGetSetDef Route_getset[] = {
    {"copies", (getter)Route_get_copies, NULL, "the ready copies (a snapshot)", NULL},
    {"kind", (getter)Route_get_kind, NULL, "audio or video", NULL},
    {"attention", (getter)Route_get_attention, (setter)Route_set_attention,
     "hand this producer's packets to Python before the fan-out", NULL},
    {NULL}};

static PyMemberDef Route_members[] = {
    {"owner", T_OBJECT_EX, offsetof(Route, owner), 0, "the Producer"}, {NULL}};

static PyMethodDef Route_methods[] = {
    {"add", (PyCFunction)Route_add, METH_O, "Start sending to a copy."},
    {"remove", (PyCFunction)Route_remove, METH_O, "Stop sending to a copy."},
    {"clear", (PyCFunction)Route_clear, METH_NOARGS, "Drop every copy."},
    {NULL}};

static PyTypeObject RouteType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sfu.media._fastpath.Route",
    .tp_basicsize = sizeof(Route),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One producer's ready copies.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Route_init,
    .tp_dealloc = (destructor)Route_dealloc,
    .tp_traverse = (traverseproc)Route_traverse,
    .tp_clear = (inquiry)Route_clear_refs,
    .tp_members = Route_members,
    .tp_getset = Route_getset,
    .tp_methods = Route_methods,
};

/* ------------------------------------------------------------------------------------- */
/* Core: the socket, the batches, the loop.                                              */

enum {
    C_FAST_DATAGRAMS,
    C_OUT_AUDIO,
    C_OUT_AUDIO_BYTES,
    C_OUT_VIDEO,
    C_OUT_VIDEO_BYTES,
    C_RTP_OUT,
    C_RTP_BYTES_OUT,
    C_PROTECT_FAILURES,
    C_SEND_ERRORS,
    C_INTEGRITY_MATCH,
    C_INTEGRITY_MISMATCH,
    C_COUNT
};

typedef struct {
    PyObject_HEAD
    int fd;
    PyObject *capture; /* tests without a socket: called as capture(data, addr) per send */
    srtp_fn protect;
    srtp_fn unprotect;
    PyObject *peers; /* dict: address key (bytes) -> Peer */
    /* receive side */
    struct mmsghdr rmsg[RECV_BATCH];
    struct iovec riov[RECV_BATCH];
    struct sockaddr_storage raddr[RECV_BATCH];
    uint8_t rbuf[RECV_BATCH][RECV_SLOT];
    int rcount, rpos;
    int last_read; /* datagrams the last recvmmsg returned (0: none, or nothing was there) */
    uint8_t plain[RECV_SLOT];
    /* send side */
    struct mmsghdr smsg[SEND_BATCH];
    struct iovec siov[SEND_BATCH];
    uint8_t sbuf[SEND_BATCH][SEND_SLOT];
    int scount;
    /* counters, drained by take_counters() */
    unsigned long long counts[C_COUNT];
    int sample_every, countdown;
    long long faults;
    /* latency: receive to flush of one sampled packet in LATENCY_SAMPLE_EVERY */
    int latency_countdown;
    double pending_sample;
    double latency[MAX_LATENCY_SAMPLES];
    int latency_count;
} Core;

static int Core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "protect", "unprotect", "integrity_sample_every", "capture",
                             NULL};
    int fd, every = 0;
    unsigned long long protect, unprotect;
    PyObject *capture = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKK|iO", kwlist, &fd, &protect, &unprotect,
                                     &every, &capture))
        return -1;
    if (fd < 0 && !PyCallable_Check(capture)) {
        PyErr_SetString(PyExc_ValueError, "without a socket (fd -1), capture must be callable");
        return -1;
    }
    if (capture != Py_None) {
        Py_INCREF(capture);
        Py_XSETREF(self->capture, capture);
    }
    if (protect == 0 || unprotect == 0) {
        PyErr_SetString(PyExc_ValueError, "srtp_protect and srtp_unprotect are required");
        return -1;
    }
    self->fd = fd;
    self->protect = (srtp_fn)(uintptr_t)protect;
    self->unprotect = (srtp_fn)(uintptr_t)unprotect;
    Py_XSETREF(self->peers, PyDict_New());
    if (self->peers == NULL)
        return -1;
    for (int i = 0; i < RECV_BATCH; i++) {
        self->riov[i].iov_base = self->rbuf[i];
        self->riov[i].iov_len = RECV_SLOT;
        memset(&self->rmsg[i], 0, sizeof(self->rmsg[i]));
        self->rmsg[i].msg_hdr.msg_iov = &self->riov[i];
        self->rmsg[i].msg_hdr.msg_iovlen = 1;
    }
    for (int i = 0; i < SEND_BATCH; i++) {
        memset(&self->smsg[i], 0, sizeof(self->smsg[i]));
        self->siov[i].iov_base = self->sbuf[i];
        self->smsg[i].msg_hdr.msg_iov = &self->siov[i];
        self->smsg[i].msg_hdr.msg_iovlen = 1;
    }
    self->rcount = self->rpos = self->scount = 0;
    self->last_read = 0;
    memset(self->counts, 0, sizeof(self->counts));
    self->sample_every = self->countdown = every < 0 ? 0 : every;
    self->faults = 0;
    self->latency_countdown = LATENCY_SAMPLE_EVERY;
    self->pending_sample = 0.0;
    self->latency_count = 0;
    return 0;
}

static int Core_traverse(Core *self, visitproc visit, void *arg)
{
    Py_VISIT(self->peers);
    Py_VISIT(self->capture);
    return 0;
}

static int Core_clear(Core *self)
{
    Py_CLEAR(self->peers);
    Py_CLEAR(self->capture);
    return 0;
}

static void Core_dealloc(Core *self)
{
    PyObject_GC_UnTrack(self);
    Core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The dict key for an address: family byte, port, address bytes. address_key() in Python
 * builds the same from (host, port). */
static PyObject *key_from_sockaddr(const struct sockaddr_storage *sa)
{
    uint8_t key[19];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)sa;
        key[0] = 4;
        memcpy(key + 1, &v4->sin_port, 2);
        memcpy(key + 3, &v4->sin_addr, 4);
        return PyBytes_FromStringAndSize((const char *)key, 7);
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)sa;
        key[0] = 6;
        memcpy(key + 1, &v6->sin6_port, 2);
        memcpy(key + 3, &v6->sin6_addr, 16);
        return PyBytes_FromStringAndSize((const char *)key, 19);
    }
    Py_RETURN_NONE;
}

static PyObject *address_tuple(const struct sockaddr_storage *sa)
{
    char host[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host));
        return Py_BuildValue("(si)", host, ntohs(v4->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host));
        return Py_BuildValue("(siII)", host, ntohs(v6->sin6_port), ntohl(v6->sin6_flowinfo),
                             v6->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

static void capture_all(Core *self)
{
    for (int i = 0; i < self->scount; i++) {
        struct mmsghdr *m = &self->smsg[i];
        PyObject *data = PyBytes_FromStringAndSize((const char *)self->sbuf[i],
                                                   (Py_ssize_t)self->siov[i].iov_len);
        PyObject *addr = data ? address_tuple(m->msg_hdr.msg_name) : NULL;
        PyObject *r = addr ? PyObject_CallFunctionObjArgs(self->capture, data, addr, NULL) : NULL;
        if (r == NULL)
            PyErr_WriteUnraisable(self->capture);
        Py_XDECREF(r);
        Py_XDECREF(addr);
        Py_XDECREF(data);
    }
}

static void flush(Core *self)
{
    int done = 0;
    if (self->capture != NULL && self->scount > 0) {
        capture_all(self);
        done = self->scount;
    }
    while (done < self->scount) {
        int n = sendmmsg(self->fd, self->smsg + done, (unsigned int)(self->scount - done), 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* The datagram at `done` failed (a full buffer, an unreachable address): UDP
             * drops it, as the Python path's sendto would; go on with the rest. */
            self->counts[C_SEND_ERRORS]++;
            done++;
            continue;
        }
        done += n;
    }
    self->scount = 0;
    if (self->pending_sample > 0.0) {
        if (self->latency_count < MAX_LATENCY_SAMPLES)
            self->latency[self->latency_count++] = monotonic_now() - self->pending_sample;
        self->pending_sample = 0.0;
    }
}

/* The loop: one decrypted packet to every ready copy of a route. Copies whose extension
 * block cannot be rewritten in place are appended to *attention (a new list on first use).
 * Returns -1 with an exception set only on memory errors. */
static int fan_out(Core *self, Route *route, const uint8_t *plain, int len, const rtp_header *h,
                   double now, PyObject **attention)
{
    PyObject *copies = route->copies;
    Py_ssize_t n = PyList_GET_SIZE(copies);
    int plain_ext = h->ext_profile < 0;
    int payload_len = h->payload_end - h->header_len;
    unsigned long long *out_count = &self->counts[route->kind ? C_OUT_VIDEO : C_OUT_AUDIO];
    for (Py_ssize_t i = 0; i < n; i++) {
        Copy *copy = (Copy *)PyList_GET_ITEM(copies, i);
        Peer *peer = (Peer *)copy->peer;
        if (self->scount == SEND_BATCH)
            flush(self);
        uint8_t *out = self->sbuf[self->scount];
        uint16_t seq = (uint16_t)(h->seq + copy->seq_offset);
        uint32_t ts = h->ts + copy->ts_offset;
        int built = len <= SEND_SLOT - 160;
        if (built) {
            memcpy(out, plain, (size_t)len);
            out[1] = (uint8_t)((plain[1] & 0x80) | copy->payload_type);
            out[2] = (uint8_t)(seq >> 8);
            out[3] = (uint8_t)seq;
            out[4] = (uint8_t)(ts >> 24);
            out[5] = (uint8_t)(ts >> 16);
            out[6] = (uint8_t)(ts >> 8);
            out[7] = (uint8_t)ts;
            out[8] = (uint8_t)(copy->ssrc >> 24);
            out[9] = (uint8_t)(copy->ssrc >> 16);
            out[10] = (uint8_t)(copy->ssrc >> 8);
            out[11] = (uint8_t)copy->ssrc;
            if (!plain_ext && !copy->identity_ext && !remap_ids(out, h, copy->ext_map)) {
                if (*attention == NULL && (*attention = PyList_New(0)) == NULL)
                    return -1;
                if (PyList_Append(*attention, (PyObject *)copy) < 0)
                    return -1;
                continue;
            }
            if (self->faults > 0) {
                self->faults--;
                out[len - 1] ^= 0x01;
            }
            if (self->sample_every > 0 && --self->countdown <= 0) {
                self->countdown = self->sample_every;
                int same = memcmp(out + h->header_len, plain + h->header_len,
                                  (size_t)(len - h->header_len)) == 0;
                self->counts[same ? C_INTEGRITY_MATCH : C_INTEGRITY_MISMATCH]++;
            }
        }
        if (peer->tx != NULL && peer->addrlen > 0) {
            int size = len;
            if (built && len <= MAX_PROTECT_SIZE && peer->twcc_id) {
                uint16_t ahead = (uint16_t)(seq - copy->last_seq);
                twcc_stamp(peer, out, len, now, ahead != 0 && ahead < 0x8000);
            }
            if (!built || len > MAX_PROTECT_SIZE || self->protect(peer->tx, out, &size) != 0) {
                self->counts[C_PROTECT_FAILURES]++;
            } else {
                struct mmsghdr *m = &self->smsg[self->scount++];
                m->msg_hdr.msg_name = &peer->addr;
                m->msg_hdr.msg_namelen = peer->addrlen;
                self->siov[m - self->smsg].iov_len = (size_t)size;
                self->counts[C_RTP_OUT]++;
                self->counts[C_RTP_BYTES_OUT] += (unsigned long long)size;
            }
        }
        out_count[0]++;
        out_count[1] += (unsigned long long)len;
        if ((uint16_t)(seq - copy->last_seq) < 0x8000) {
            copy->last_seq = seq;
            copy->last_ts = ts;
            copy->last_at = now;
        }
        copy->packets++;
        copy->payload_octets += (unsigned long long)payload_len;
    }
    return 0;
}

static PyObject *event_raw(Core *self, int i)
{
    PyObject *data =
        PyBytes_FromStringAndSize((const char *)self->rbuf[i], (Py_ssize_t)self->rmsg[i].msg_len);
    if (data == NULL)
        return NULL;
    PyObject *addr = address_tuple(&self->raddr[i]);
    if (addr == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    PyObject *ev = PyTuple_Pack(2, data, addr);
    Py_DECREF(data);
    Py_DECREF(addr);
    return ev;
}

/* (transport, producer or None, plain bytes, wire length, attention or None) */
static PyObject *event_plain(Peer *peer, Route *route, int len, int wire, PyObject *attention,
                             const uint8_t *plain)
{
    PyObject *ev = PyTuple_New(5);
    if (ev == NULL)
        return NULL;
    PyObject *data = PyBytes_FromStringAndSize((const char *)plain, len);
    PyObject *wl = PyLong_FromLong(wire);
    if (data == NULL || wl == NULL) {
        Py_XDECREF(data);
        Py_XDECREF(wl);
        Py_DECREF(ev);
        return NULL;
    }
    Py_INCREF(peer->owner);
    PyTuple_SET_ITEM(ev, 0, peer->owner);
    PyObject *owner = route != NULL ? route->owner : Py_None;
    Py_INCREF(owner);
    PyTuple_SET_ITEM(ev, 1, owner);
    PyTuple_SET_ITEM(ev, 2, data);
    PyTuple_SET_ITEM(ev, 3, wl);
    if (attention == NULL)
        attention = Py_None;
    Py_INCREF(attention);
    PyTuple_SET_ITEM(ev, 4, attention);
    return ev;
}

/* One datagram. Returns 1 to go on with the batch, 0 to stop after it, -1 on error. */
static int handle(Core *self, int i, double now, PyObject *events)
{
    uint8_t *d = self->rbuf[i];
    int len = (int)self->rmsg[i].msg_len;
    int stop = 1;
    PyObject *ev = NULL;
    /* RFC 7983: 128-191 is RTP or RTCP; RFC 5761: RTCP types 192-223 sit at 64-95. */
    if (len >= 12 && d[0] >= 128 && d[0] < 192 && !((d[1] & 0x7F) >= 64 && (d[1] & 0x7F) <= 95)) {
        PyObject *key = key_from_sockaddr(&self->raddr[i]);
        if (key == NULL)
            return -1;
        Peer *peer = (Peer *)PyDict_GetItemWithError(self->peers, key);
        Py_DECREF(key);
        if (peer == NULL && PyErr_Occurred())
            return -1;
        if (peer != NULL && peer->rx != NULL && !peer->python_only && len <= RECV_SLOT) {
            uint32_t ssrc = (uint32_t)d[8] << 24 | (uint32_t)d[9] << 16 | (uint32_t)d[10] << 8 | d[11];
            Route *route;
            if (peer->cached_route != NULL && peer->cached_ssrc == ssrc) {
                route = (Route *)peer->cached_route;
            } else {
                PyObject *k = PyLong_FromUnsignedLong(ssrc);
                if (k == NULL)
                    return -1;
                route = (Route *)PyDict_GetItemWithError(peer->routes, k);
                Py_DECREF(k);
                if (route == NULL && PyErr_Occurred())
                    return -1;
                if (route != NULL && !PyObject_TypeCheck((PyObject *)route, &RouteType))
                    route = NULL;
                if (route != NULL) {
                    peer->cached_ssrc = ssrc;
                    peer->cached_route = (PyObject *)route;
                }
            }
            /* One packet in LATENCY_SAMPLE_EVERY that the core forwards is timed from
             * here (before unprotect) to the sendmmsg carrying its copies. */
            double started = 0.0;
            if (route != NULL && !route->attention && --self->latency_countdown <= 0) {
                self->latency_countdown = LATENCY_SAMPLE_EVERY;
                started = monotonic_now();
            }
            uint8_t *plain = self->plain;
            memcpy(plain, d, (size_t)len);
            int size = len;
            if (self->unprotect(peer->rx, plain, &size) == 0) {
                /* Decrypted: from here on the packet is consumed, never handed back raw. */
                self->counts[C_FAST_DATAGRAMS]++;
                rtp_header h;
                PyObject *attention = NULL;
                if (route != NULL && !route->attention && parse_rtp(plain, size, &h)) {
                    /* Route is borrowed from peer->routes; keep it alive across the loop. */
                    Py_INCREF(route);
                    int rc = fan_out(self, route, plain, size, &h, now, &attention);
                    if (rc < 0) {
                        Py_DECREF(route);
                        Py_XDECREF(attention);
                        return -1;
                    }
                    if (started > 0.0 && self->pending_sample == 0.0)
                        self->pending_sample = started;
                    stop = attention != NULL;
                    ev = event_plain(peer, route, size, len, attention, plain);
                    Py_DECREF(route);
                    Py_XDECREF(attention);
                } else {
                    ev = event_plain(peer, NULL, size, len, NULL, plain);
                }
                if (ev == NULL)
                    return -1;
                int rc = PyList_Append(events, ev);
                Py_DECREF(ev);
                return rc < 0 ? -1 : !stop;
            }
            /* An SRTP failure: Python unprotects the original again (libsrtp left its
             * state as it was) and counts the failure by its kind. */
        }
    }
    ev = event_raw(self, i);
    if (ev == NULL)
        return -1;
    int rc = PyList_Append(events, ev);
    Py_DECREF(ev);
    return rc < 0 ? -1 : 0;
}

static PyObject *Core_receive(Core *self, PyObject *args)
{
    double now;
    int read_more = 1;
    if (!PyArg_ParseTuple(args, "d|p", &now, &read_more))
        return NULL;
    if (self->rpos >= self->rcount) {
        if (!read_more || self->fd < 0)
            Py_RETURN_NONE;
        for (int i = 0; i < RECV_BATCH; i++) {
            self->rmsg[i].msg_hdr.msg_name = &self->raddr[i];
            self->rmsg[i].msg_hdr.msg_namelen = sizeof(self->raddr[i]);
            self->rmsg[i].msg_hdr.msg_flags = 0;
        }
        int n;
        do {
            n = recvmmsg(self->fd, self->rmsg, RECV_BATCH, MSG_DONTWAIT, NULL);
        } while (n < 0 && errno == EINTR);
        self->last_read = n < 0 ? 0 : n;
        if (n <= 0)
            Py_RETURN_NONE;
        self->rcount = n;
        self->rpos = 0;
    }
    PyObject *events = PyList_New(0);
    if (events == NULL)
        return NULL;
    while (self->rpos < self->rcount) {
        int i = self->rpos++;
        int go_on = handle(self, i, now, events);
        if (go_on < 0) {
            flush(self);
            Py_DECREF(events);
            return NULL;
        }
        if (!go_on)
            break;
    }
    flush(self);
    return events;
}

static PyObject *Core_fan_out(Core *self, PyObject *args)
{
    Route *route;
    Py_buffer buf;
    double now;
    if (!PyArg_ParseTuple(args, "O!y*d", &RouteType, &route, &buf, &now))
        return NULL;
    rtp_header h;
    PyObject *attention = NULL;
    if (buf.len > RECV_SLOT || !parse_rtp(buf.buf, (int)buf.len, &h)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "not an RTP packet the fan-out can take");
        return NULL;
    }
    Py_INCREF(route);
    int rc = fan_out(self, route, buf.buf, (int)buf.len, &h, now, &attention);
    Py_DECREF(route);
    flush(self);
    PyBuffer_Release(&buf);
    if (rc < 0) {
        Py_XDECREF(attention);
        return NULL;
    }
    if (attention == NULL)
        Py_RETURN_NONE;
    return attention;
}

static PyObject *Core_send_one(Core *self, PyObject *args)
{
    Copy *copy;
    Py_buffer buf;
    double now;
    const char *kind;
    if (!PyArg_ParseTuple(args, "O!y*ds", &CopyType, &copy, &buf, &now, &kind))
        return NULL;
    rtp_header h;
    if (buf.len > RECV_SLOT || !parse_rtp(buf.buf, (int)buf.len, &h)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "not an RTP packet the fan-out can take");
        return NULL;
    }
    /* A route of one, so the single copy goes through exactly the same loop. */
    Route *one = PyObject_GC_New(Route, &RouteType);
    if (one == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    one->owner = Py_None;
    Py_INCREF(Py_None);
    one->copies = PyList_New(1);
    one->attention = 0;
    one->kind = strcmp(kind, "video") == 0;
    if (one->copies == NULL) {
        Py_DECREF(one);
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_INCREF(copy);
    PyList_SET_ITEM(one->copies, 0, (PyObject *)copy);
    PyObject_GC_Track(one);
    PyObject *attention = NULL;
    int rc = fan_out(self, one, buf.buf, (int)buf.len, &h, now, &attention);
    flush(self);
    Py_DECREF(one);
    PyBuffer_Release(&buf);
    if (rc < 0) {
        Py_XDECREF(attention);
        return NULL;
    }
    int ok = attention == NULL;
    Py_XDECREF(attention);
    return PyBool_FromLong(ok);
}

static PyObject *Core_inject(Core *self, PyObject *args)
{
    Py_buffer buf;
    const char *host;
    int port;
    if (!PyArg_ParseTuple(args, "y*(si)", &buf, &host, &port))
        return NULL;
    if (self->rpos < self->rcount || buf.len > RECV_SLOT) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "inject: datagrams still pending, or too long");
        return NULL;
    }
    socklen_t len;
    if (!fill_sockaddr(host, port, &self->raddr[0], &len)) {
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "not a numeric IP address and port: %s %d", host, port);
        return NULL;
    }
    memcpy(self->rbuf[0], buf.buf, (size_t)buf.len);
    self->rmsg[0].msg_len = (unsigned int)buf.len;
    self->rcount = 1;
    self->rpos = 0;
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static PyObject *Core_map_address(Core *self, PyObject *args)
{
    PyObject *key, *peer;
    if (!PyArg_ParseTuple(args, "SO", &key, &peer))
        return NULL;
    if (peer == Py_None) {
        if (PyDict_DelItem(self->peers, key) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError))
                return NULL;
            PyErr_Clear();
        }
        Py_RETURN_NONE;
    }
    if (!PyObject_TypeCheck(peer, &PeerType)) {
        PyErr_SetString(PyExc_TypeError, "map_address takes a Peer or None");
        return NULL;
    }
    if (PyDict_SetItem(self->peers, key, peer) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static const char *COUNTER_NAMES[C_COUNT] = {
    "fast_datagrams",  "out_audio",       "out_audio_bytes", "out_video",
    "out_video_bytes", "rtp_out",         "rtp_bytes_out",   "protect_failures",
    "send_errors",     "integrity_match", "integrity_mismatch"};

static PyObject *Core_take_counters(Core *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (int i = 0; i < C_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->counts[i]);
        if (v == NULL || PyDict_SetItemString(out, COUNTER_NAMES[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
        self->counts[i] = 0;
    }
    return out;
}

static PyObject *Core_take_latency(Core *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(self->latency_count);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < self->latency_count; i++) {
        PyObject *v = PyFloat_FromDouble(self->latency[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    self->latency_count = 0;
    return out;
}

static PyObject *Core_inject_payload_fault(Core *self, PyObject *args)
{
    long long n;
    if (!PyArg_ParseTuple(args, "L", &n))
        return NULL;
    self->faults = n < 0 ? 0 : n;
    Py_RETURN_NONE;
}

static PyObject *Core_get_drained(Core *self, void *c)
{
    /* Nothing left in hand, and the last read did not fill a batch: the socket was most
     * likely empty, and a level-triggered reader fires again if it is not. */
    return PyBool_FromLong(self->rpos >= self->rcount && self->last_read < RECV_BATCH);
}

static PyGetSetDef Core_getset[] = {
    {"drained", (getter)Core_get_drained, NULL,
     "no datagram in hand and the last recvmmsg returned less than a full batch", NULL},
    {NULL}};

static PyMethodDef Core_methods[] = {
    {"receive", (PyCFunction)Core_receive, METH_VARARGS,
     "receive(now, read_more=True) -> list of events, or None when nothing was there."},
    {"fan_out", (PyCFunction)Core_fan_out, METH_VARARGS,
     "fan_out(route, plain, now) -> copies needing a rebuild, or None."},
    {"send_one", (PyCFunction)Core_send_one, METH_VARARGS,
     "send_one(copy, plain, now, kind) -> False if the copy needs a rebuild."},
    {"inject", (PyCFunction)Core_inject, METH_VARARGS,
     "Test only: inject(data, (host, port)) as if one datagram had been read."},
    {"map_address", (PyCFunction)Core_map_address, METH_VARARGS,
     "map_address(key, peer or None): which Peer a source address belongs to."},
    {"take_counters", (PyCFunction)Core_take_counters, METH_NOARGS,
     "Counters since the last call, as a dict."},
    {"take_latency", (PyCFunction)Core_take_latency, METH_NOARGS,
     "Sampled receive-to-send latencies (seconds) since the last call."},
    {"inject_payload_fault", (PyCFunction)Core_inject_payload_fault, METH_VARARGS,
     "Test only: flip the last byte of the next N copies before the integrity sample."},
    {NULL}};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sfu.media._fastpath.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The native fan-out core of one media socket.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};

static PyObject *address_key(PyObject *mod, PyObject *args)
{
    const char *host;
    int port;
    if (!PyArg_ParseTuple(args, "si", &host, &port))
        return NULL;
    struct sockaddr_storage sa;
    socklen_t len;
    if (!fill_sockaddr(host, port, &sa, &len)) {
        PyErr_Format(PyExc_ValueError, "not a numeric IP address and port: %s %d", host, port);
        return NULL;
    }
    return key_from_sockaddr(&sa);
}

static PyMethodDef module_methods[] = {
    {"address_key", address_key, METH_VARARGS,
     "address_key(host, port) -> the key Core.map_address takes."},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sfu.media._fastpath",
    "Native fan-out core (see sfu/media/router.py for the reference loop).", -1,
    module_methods};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    PyTypeObject *types[] = {&PeerType, &CopyType, &RouteType, &CoreType};
    const char *names[] = {"Peer", "Copy", "Route", "Core"};
    for (int i = 0; i < 4; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    for (int i = 0; i < 4; i++) {
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
