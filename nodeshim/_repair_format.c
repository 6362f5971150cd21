/* nodeshim/_repair_format.c: the packed record of clustercore/sockwire.py, read and written
 * with every length and field checked, and the Python objects a dump builds from it. Part
 * of nodeshim._repair (see _repair.c for why the module exists). */
#include "_repair.h"

#include <arpa/inet.h>
#include <string.h>

static int seq_after(uint32_t a, uint32_t b) /* TCP's after(a, b) */
{
    uint32_t d = a - b;
    return d != 0 && d < 0x80000000u;
}

/* ------------------------------------------------------------------ the record */

static void put16(uint8_t **p, uint16_t v) { uint16_t n = htons(v); memcpy(*p, &n, 2); *p += 2; }
static void put32(uint8_t **p, uint32_t v) { uint32_t n = htonl(v); memcpy(*p, &n, 4); *p += 4; }
static uint16_t get16(const uint8_t **p) { uint16_t n; memcpy(&n, *p, 2); *p += 2; return ntohs(n); }
static uint32_t get32(const uint8_t **p) { uint32_t n; memcpy(&n, *p, 4); *p += 4; return ntohl(n); }

size_t head_size(int family) { return family == 6 ? HEAD6 : HEAD4; }

void pack_head(const struct conn *c, uint8_t *out)
{
    size_t alen = c->family == 6 ? 16 : 4;
    uint8_t *p = out;
    memcpy(p, c->lip, alen); p += alen;
    put16(&p, c->lport);
    memcpy(p, c->rip, alen); p += alen;
    put16(&p, c->rport);
    put16(&p, c->mss);
    *p++ = c->sws;
    *p++ = c->rws;
    *p++ = c->flags;
    put32(&p, c->tsval);
    put32(&p, c->w.snd_wl1);
    put32(&p, c->w.snd_wnd);
    put32(&p, c->w.max_window);
    put32(&p, c->w.rcv_wnd);
    put32(&p, c->w.rcv_wup);
    put32(&p, c->send_seq);
    put32(&p, c->recv_seq);
    put32(&p, c->rlen);
    put32(&p, c->slen);
    put32(&p, c->unsent);
    *p++ = c->nlen;
}

/* The checks TcpConnState.__post_init__ makes, on values from the kernel or a record.
 * Returns NULL when the connection is fine, else what is wrong. */
const char *check_conn(const struct conn *c)
{
    if (c->lport == 0 || c->rport == 0) return "port 0";
    if (c->mss == 0) return "mss 0";
    if (c->flags & ~(F_WS | F_TS | F_SACK)) return "unknown flag bits";
    if (c->sws > MAX_WSCALE || c->rws > MAX_WSCALE) return "window scale above 14";
    if (!(c->flags & F_WS) && (c->sws || c->rws)) return "window scales set but window_scaling is false";
    if (c->rlen >= QUEUE_MAX || c->slen >= QUEUE_MAX) return "a queue of 1 GiB or more";
    if (c->unsent > c->slen) return "unsent_len larger than the send queue";
    if (c->w.max_window < c->w.snd_wnd) return "max_window smaller than snd_wnd";
    if (seq_after(c->w.rcv_wup, c->recv_seq)) return "rcv_wup after recv_seq";
    if (seq_after(c->w.snd_wl1, c->recv_seq + c->w.rcv_wnd)) return "snd_wl1 after recv_seq + rcv_wnd";
    for (unsigned i = 0; i < c->nlen; i++) /* LISTEN_FDNAMES: printable ASCII, no ':' */
        if (c->name[i] <= 32 || c->name[i] >= 127 || c->name[i] == ':') return "bad name";
    return NULL;
}

/* Parse one whole record of `len` bytes (exactly one: no trailing bytes). Total: any
 * input gives 0 (c filled) or -1 with *why set; nothing outside data[0..len) is read. */
int parse_record(const uint8_t *data, size_t len, int family, struct conn *c, const char **why)
{
    size_t alen = family == 6 ? 16 : 4, head = head_size(family);
    const uint8_t *p = data;
    memset(c, 0, sizeof *c);
    if (family != 4 && family != 6) { *why = "family must be 4 or 6"; return -1; }
    if (len < head) { *why = "truncated record"; return -1; }
    c->family = family;
    memcpy(c->lip, p, alen); p += alen;
    c->lport = get16(&p);
    memcpy(c->rip, p, alen); p += alen;
    c->rport = get16(&p);
    c->mss = get16(&p);
    c->sws = *p++;
    c->rws = *p++;
    c->flags = *p++;
    c->tsval = get32(&p);
    c->w.snd_wl1 = get32(&p);
    c->w.snd_wnd = get32(&p);
    c->w.max_window = get32(&p);
    c->w.rcv_wnd = get32(&p);
    c->w.rcv_wup = get32(&p);
    c->send_seq = get32(&p);
    c->recv_seq = get32(&p);
    c->rlen = get32(&p);
    c->slen = get32(&p);
    c->unsent = get32(&p);
    c->nlen = *p++;
    /* 64-bit sum: three lengths below 2^32 cannot overflow it */
    if ((uint64_t)c->nlen + c->rlen + c->slen != (uint64_t)(len - head)) {
        *why = "record length does not match its queue and name lengths";
        return -1;
    }
    c->name = p;
    c->rq = c->name + c->nlen;
    c->sq = c->rq + c->rlen;
    if ((*why = check_conn(c)) != NULL) return -1;
    return 0;
}

/* ------------------------------------------------------------------ states */

/* clustercore.sockstate's TcpConnState and TcpWindow, built here as
 * clustercore.sockwire.from_local_record builds them (see there why without a second
 * check): the classes, sockwire's ip-to-text function and the size up to which a state
 * keeps its record come from the caller, nothing is assumed but the field names. */
enum { F_LOCAL, F_REMOTE, F_FAMILY, F_STATE, F_MSS, F_WSCALING, F_SWS, F_RWS, F_TIMESTAMPS,
       F_TSVAL, F_SACKF, F_WINDOW, F_SEND_SEQ, F_RECV_SEQ, F_RECV_QUEUE, F_SEND_QUEUE,
       F_UNSENT, F_NAME, F_PACKED, N_FIELDS };
static const char *field_names[N_FIELDS] = {
    "local", "remote", "family", "state", "mss", "window_scaling", "snd_wscale", "rcv_wscale",
    "timestamps", "tsval", "sack", "window", "send_seq", "recv_seq", "recv_queue", "send_queue",
    "unsent_len", "name", "packed"};
static const char *window_names[5] = {"snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"};
static PyObject *field_str[N_FIELDS], *window_str[5], *established_str;


static PyObject *ip_object(struct builder *b, const uint8_t *ip, int family)
{
    PyObject *key = PyBytes_FromStringAndSize((const char *)ip, family == 6 ? 16 : 4), *text;
    if (!key) return NULL;
    text = PyDict_GetItemWithError(b->ips, key);
    if (text) {
        Py_INCREF(text);
    } else if (!PyErr_Occurred()) {
        text = PyObject_CallOneArg(b->ip_text, key);
        if (text && PyDict_SetItem(b->ips, key, text) < 0) Py_CLEAR(text);
    }
    Py_DECREF(key);
    return text;
}

static PyObject *addr_object(struct builder *b, const uint8_t *ip, uint16_t port, int family)
{
    PyObject *text = ip_object(b, ip, family);
    return text ? Py_BuildValue("(Ni)", text, (int)port) : NULL;
}

/* set each value (stolen) on obj; 0 or -1 */
static int set_all(PyObject *obj, PyObject **names, PyObject **values, int n)
{
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (!values[i]) { rc = -1; continue; }
        if (rc == 0 && PyObject_GenericSetAttr(obj, names[i], values[i]) < 0) rc = -1;
    }
    for (int i = 0; i < n; i++) Py_XDECREF(values[i]);
    return rc;
}

PyObject *make_state(struct builder *b, const struct conn *c, PyObject *rec)
{
    PyObject *v[N_FIELDS], *w[5], *win, *st;
    win = b->win_t->tp_alloc(b->win_t, 0);
    if (!win) return NULL;
    w[0] = PyLong_FromUnsignedLong(c->w.snd_wl1);
    w[1] = PyLong_FromUnsignedLong(c->w.snd_wnd);
    w[2] = PyLong_FromUnsignedLong(c->w.max_window);
    w[3] = PyLong_FromUnsignedLong(c->w.rcv_wnd);
    w[4] = PyLong_FromUnsignedLong(c->w.rcv_wup);
    if (set_all(win, window_str, w, 5) < 0) { Py_DECREF(win); return NULL; }
    st = b->conn_t->tp_alloc(b->conn_t, 0);
    if (!st) { Py_DECREF(win); return NULL; }
    v[F_LOCAL] = addr_object(b, c->lip, c->lport, c->family);
    v[F_REMOTE] = addr_object(b, c->rip, c->rport, c->family);
    v[F_FAMILY] = PyLong_FromLong(c->family);
    v[F_STATE] = Py_NewRef(established_str);
    v[F_MSS] = PyLong_FromLong(c->mss);
    v[F_WSCALING] = PyBool_FromLong(c->flags & F_WS);
    v[F_SWS] = PyLong_FromLong(c->sws);
    v[F_RWS] = PyLong_FromLong(c->rws);
    v[F_TIMESTAMPS] = PyBool_FromLong(c->flags & F_TS);
    v[F_TSVAL] = PyLong_FromUnsignedLong(c->tsval);
    v[F_SACKF] = PyBool_FromLong(c->flags & F_SACK);
    v[F_WINDOW] = win;
    v[F_SEND_SEQ] = PyLong_FromUnsignedLong(c->send_seq);
    v[F_RECV_SEQ] = PyLong_FromUnsignedLong(c->recv_seq);
    v[F_RECV_QUEUE] = PyBytes_FromStringAndSize((const char *)c->rq, c->rlen);
    v[F_SEND_QUEUE] = PyBytes_FromStringAndSize((const char *)c->sq, c->slen);
    v[F_UNSENT] = PyLong_FromUnsignedLong(c->unsent);
    v[F_NAME] = c->nlen ? PyUnicode_DecodeASCII((const char *)c->name, c->nlen, "strict") : Py_NewRef(Py_None);
    v[F_PACKED] = Py_NewRef(PyBytes_GET_SIZE(rec) <= b->keep_max ? rec : Py_None);
    if (set_all(st, field_str, v, N_FIELDS) < 0) { Py_DECREF(st); return NULL; }
    return st;
}

int repair_format_init(void)
{
    for (int i = 0; i < N_FIELDS; i++)
        if (!(field_str[i] = PyUnicode_InternFromString(field_names[i]))) return -1;
    for (int i = 0; i < 5; i++)
        if (!(window_str[i] = PyUnicode_InternFromString(window_names[i]))) return -1;
    if (!(established_str = PyUnicode_InternFromString("ESTABLISHED"))) return -1;
    return 0;
}

/* ------------------------------------------------------------------ records from a peer */

/* unpack_many(data, family, (TcpConnState, TcpWindow, ip_text, keep_max)) -> list of
 * TcpConnState: the records of clustercore.sockwire.pack_connections, back to back, as
 * sockwire.unpack_connections reads them. Each record is checked whole by parse_record
 * (every length against the buffer, every field as TcpConnState.__post_init__) before its
 * objects are built; anything else raises ValueError naming the byte where it failed.
 * Total: nothing outside the buffer is read. It refuses a little more than the Python
 * reader (flag bits the format does not define); sockwire then asks the Python reader,
 * which has the last word. */
PyObject *py_unpack_many(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    int family;
    PyObject *types, *ct, *wt, *out = NULL;
    struct builder b = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iO", &buf, &family, &types)) return NULL;
    if (!PyArg_ParseTuple(types, "OOOn", &ct, &wt, &b.ip_text, &b.keep_max)) goto done;
    if (!PyType_Check(ct) || !PyType_Check(wt) || !PyCallable_Check(b.ip_text)) {
        PyErr_SetString(PyExc_TypeError, "unpack_many: (TcpConnState, TcpWindow, ip_text, keep_max)");
        goto done;
    }
    if (family != 4 && family != 6) {
        PyErr_SetString(PyExc_ValueError, "unpack_many: family must be 4 or 6");
        goto done;
    }
    b.conn_t = (PyTypeObject *)ct;
    b.win_t = (PyTypeObject *)wt;
    if (!(b.ips = PyDict_New()) || !(out = PyList_New(0))) goto done;
    {
        const uint8_t *data = buf.buf;
        size_t len = (size_t)buf.len, off = 0, head = head_size(family);
        while (off < len) {
            const uint8_t *h = data + off, *p;
            uint64_t total;
            struct conn c;
            const char *why;
            PyObject *rec, *st;
            int rc;
            if (len - off < head) {
                PyErr_Format(PyExc_ValueError, "packed connections: truncated record at byte %zu", off);
                goto bad;
            }
            /* the head ends with len(recv_queue) I, len(send_queue) I, unsent_len I, len(name) B */
            p = h + head - 13;
            total = (uint64_t)head + h[head - 1] + get32(&p);
            total += get32(&p);
            if (total > len - off) {
                PyErr_Format(PyExc_ValueError, "packed connections: truncated queues at byte %zu", off + head);
                goto bad;
            }
            if (parse_record(h, (size_t)total, family, &c, &why) < 0) {
                PyErr_Format(PyExc_ValueError, "packed connections: %s (record at byte %zu)", why, off);
                goto bad;
            }
            if (!(rec = PyBytes_FromStringAndSize((const char *)h, (Py_ssize_t)total))) goto bad;
            st = make_state(&b, &c, rec);
            Py_DECREF(rec);
            if (!st) goto bad;
            rc = PyList_Append(out, st);
            Py_DECREF(st);
            if (rc < 0) goto bad;
            off += (size_t)total;
        }
    }
    goto done;
bad:
    Py_CLEAR(out);
done:
    Py_XDECREF(b.ips);
    PyBuffer_Release(&buf);
    return out;
}
