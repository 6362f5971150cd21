/* nodeshim._repair: the per-connection TCP_REPAIR loops of nodeshim.tcprepair, in C.
 *
 * Why: in Python each connection costs about 14 syscalls to dump and 15 to restore, each
 * wrapped in an interpreter call, an exception check and an int or bytes object; on this
 * nested VM that is 20-30 us per connection and per step, the bulk of a migration's freeze.
 * Here the loops run without the interpreter. The kernel has no batched TCP_REPAIR call
 * (every option is per socket), so "batching" is one C call per list of sockets: the
 * syscalls themselves stay one per option.
 *
 * Written directly rather than linking CRIU's libsoccr: libsoccr is LGPL-2.1 (fine), but
 * it needs CRIU's build tree (its headers and compel's helpers), it allocates one
 * libsoccr_sk per socket and copies the queues twice, and its data layout is not ours. What
 * it does is ~15 calls in a fixed order, which nodeshim/tcprepair.py already documents
 * (and KERNEL-NOTES "Moving a TCP connection" measured); this file does the same calls in
 * the same order.
 *
 * The state format is clustercore/sockwire.py's packed record (network byte order):
 *   local ip (4 or 16), local port H, remote ip, remote port H, mss H, snd_wscale B,
 *   rcv_wscale B, flags B (1 wscale, 2 timestamps, 4 sack), tsval I, snd_wl1 I,
 *   snd_wnd I, max_window I, rcv_wnd I, rcv_wup I, send_seq I, recv_seq I,
 *   len(recv_queue) I, len(send_queue) I, unsent_len I, len(name) B;
 *   then name, recv_queue, send_queue.
 * so a record this module dumps can be unpacked and restored by the Python code, and the
 * other way round (tests/lab/test_repair_c.py does both).
 *
 * Restoring parses bytes that came from another node: parse_record (_repair_format.c, with
 * the rest of the record's code and the objects a dump builds) checks every length and
 * every field before a single syscall and never reads past the buffer it was given.
 *
 * Errors: RepairError(index, step, errno, tcp_state): which socket of the list, which step
 * (the names tcprepair.py uses), the errno (0 when the kernel call succeeded but the
 * result is refused), the TCP state (dump only, else 0). nodeshim.tcprepair turns it into
 * KernelError / HalfClosedError. Bad arguments raise TypeError/ValueError.
 */
#include "_repair.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/sockios.h>

static PyObject *RepairError;

static void fail(Py_ssize_t index, const char *step, int err, int state)
{
    PyObject *args = Py_BuildValue("(nsii)", index, step, err, state);
    if (args) {
        PyErr_SetObject(RepairError, args);
        Py_DECREF(args);
    }
}

static int opt_int(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof value);
}

static int get_int(int fd, int level, int name, int *value)
{
    socklen_t len = sizeof *value;
    *value = 0;
    return getsockopt(fd, level, name, value, &len);
}

static int as_int(PyObject *o)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < -2147483647L - 1 || v > 2147483647L) {
        PyErr_SetString(PyExc_OverflowError, "not a C int");
        return -1;
    }
    return (int)v;
}

/* ------------------------------------------------------------------ dump */

static int sockaddr_to(const struct sockaddr_storage *ss, int *family, uint8_t ip[16], uint16_t *port)
{
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        *family = 4;
        memcpy(ip, &a->sin_addr, 4);
        *port = ntohs(a->sin_port);
        return 0;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        *family = 6;
        memcpy(ip, &a->sin6_addr, 16);
        *port = ntohs(a->sin6_port);
        return 0;
    }
    return -1;
}

/* Why a dump failed: dump_many's RepairError(index, step, errno, tcp_state). */
struct dump_fail {
    const char *step;
    int err, state;
};

/* Read one connection whose socket is in repair mode, without the interpreter (the GIL is
 * released around it): the record is built in a malloc'd buffer (*out, *outlen: head,
 * name, receive queue, send queue, as sockwire packs it) and *cout filled (its pointers
 * into that buffer). Returns 0, or -1 with *why set. */
static int dump_one(int fd, const char *name, Py_ssize_t nlen, struct conn *cout, uint8_t **out_, size_t *outlen,
                    struct dump_fail *why)
{
    struct conn c;
    uint8_t info[8];
    socklen_t len = sizeof info;
    int outq = 0, unsent = 0, inq = 0, mss = 0, ts = 0, qseq = 0;
    struct repair_window w;
    const char *step = "TCP_INFO";
    uint8_t *out = NULL;
    struct sockaddr_storage ss;
    socklen_t sl;
    int fam2;

    memset(&c, 0, sizeof c);
    *out_ = NULL;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &len) < 0) goto oserr;
    if (len < 8) { errno = EIO; goto oserr; }
    if (info[0] != STATE_ESTABLISHED) {
        *why = (struct dump_fail){"state", 0, info[0]};
        return -1;
    }
    step = "SIOCOUTQ";
    if (ioctl(fd, SIOCOUTQ, &outq) < 0) goto oserr;
    step = "SIOCOUTQNSD";
    if (outq && ioctl(fd, SIOCOUTQNSD, &unsent) < 0) goto oserr;
    step = "SIOCINQ";
    if (ioctl(fd, SIOCINQ, &inq) < 0) goto oserr;
    step = "TCP_MAXSEG";
    if (get_int(fd, IPPROTO_TCP, TCP_MAXSEG, &mss) < 0) goto oserr;
    step = "TCP_REPAIR_WINDOW";
    len = sizeof w;
    if (getsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, &w, &len) < 0) goto oserr;
    if (len != sizeof w) { errno = EIO; goto oserr; }
    if (outq < 0 || inq < 0 || unsent < 0 || unsent > outq || (unsigned)outq >= QUEUE_MAX
        || (unsigned)inq >= QUEUE_MAX || mss < 1 || mss > 65535) {
        *why = (struct dump_fail){"queue sizes", 0, info[0]};
        return -1;
    }
    c.rlen = (uint32_t)inq;
    c.slen = (uint32_t)outq;
    c.nlen = (uint8_t)nlen;
    /* + 1: the spare byte of the last peek */
    out = malloc(HEAD_MAX + (size_t)nlen + (size_t)inq + (size_t)outq + 1);
    if (!out) { errno = ENOMEM; step = "memory"; goto oserr; }
    /* queues peeked straight into the record, at their final place once the head size is
     * known (the family comes from getsockname, last, as in tcprepair.py) */
    {
        uint8_t *rq = out + HEAD_MAX + nlen, *sq = rq + inq;
        ssize_t got;
        step = "receive queue";
        if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_RECV) < 0) goto oserr;
        if (get_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, &qseq) < 0) goto oserr;
        c.recv_seq = (uint32_t)qseq;
        if (inq) {
            /* one byte more than SIOCINQ said proves the length (libsoccr does too); the
             * extra byte lands in the send queue's place, or in the record's spare byte */
            got = recv(fd, rq, (size_t)inq + 1, MSG_PEEK | MSG_DONTWAIT);
            if (got < 0) goto oserr;
            if (got != inq) goto short_peek;
        }
        if (w.rcv_wup != c.recv_seq) {
            /* we owe the peer an ACK (the last segment we sent acknowledged less than we
             * have): the kernel's window probe, leaving repair mode, carries our rcv_nxt.
             * The client gets it now, not when the destination thaws 100-200 ms later
             * (its loss probe fires at about 200 ms). Then the window again: the probe
             * moved snd_wl1 and rcv_wup (tcprepair.py does the same) */
            step = "acknowledge";
            if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR, REPAIR_OFF) < 0) goto oserr;
            if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR, REPAIR_ON) < 0) goto oserr;
            len = sizeof w;
            if (getsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, &w, &len) < 0) goto oserr;
            if (len != sizeof w) { errno = EIO; goto oserr; }
        }
        step = "send queue";
        if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_SEND) < 0) goto oserr;
        if (get_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, &qseq) < 0) goto oserr;
        c.send_seq = (uint32_t)qseq;
        if (outq) {
            got = recv(fd, sq, (size_t)outq + 1, MSG_PEEK | MSG_DONTWAIT);
            if (got < 0) goto oserr;
            if (got != outq) goto short_peek;
        }
    }
    step = "addresses";
    sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) goto oserr;
    if (sockaddr_to(&ss, &c.family, c.lip, &c.lport) < 0) { errno = EAFNOSUPPORT; goto oserr; }
    sl = sizeof ss;
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0) goto oserr;
    if (sockaddr_to(&ss, &fam2, c.rip, &c.rport) < 0 || fam2 != c.family) { errno = EAFNOSUPPORT; goto oserr; }
    if (info[5] & OPT_TS) {
        /* last, after the ACK above and just before the mute: whatever this socket sent
         * carries a timestamp no newer than the one the copy continues from (a newer one,
         * kept by the client, made it drop the copy's next segment: PAWS) */
        step = "TCP_TIMESTAMP";
        if (get_int(fd, IPPROTO_TCP, TCP_TIMESTAMP, &ts) < 0) goto oserr;
    }
    c.mss = (uint16_t)mss;
    c.flags = (info[5] & OPT_WSCALE ? F_WS : 0) | (info[5] & OPT_TS ? F_TS : 0) | (info[5] & OPT_SACK ? F_SACK : 0);
    c.sws = info[5] & OPT_WSCALE ? info[6] & 0x0F : 0;
    c.rws = info[5] & OPT_WSCALE ? info[6] >> 4 : 0;
    c.tsval = (uint32_t)ts;
    c.w = w;
    c.unsent = (uint32_t)unsent;
    c.name = (const uint8_t *)name;
    {
        const char *bad = check_conn(&c);
        if (bad) {
            free(out);
            *why = (struct dump_fail){bad, 0, info[0]};
            return -1;
        }
    }
    {
        size_t head = head_size(c.family);
        if (head != HEAD_MAX) /* IPv4: slide name and queues down over the unused head room */
            memmove(out + head, out + HEAD_MAX, nlen + (size_t)inq + outq);
        if (nlen) memcpy(out + head, name, nlen);
        pack_head(&c, out);
        *outlen = head + nlen + inq + outq;
        c.name = out + head;
        c.rq = c.name + nlen;
        c.sq = c.rq + inq;
    }
    *cout = c;
    *out_ = out;
    return 0;

short_peek:
    free(out);
    *why = (struct dump_fail){"queue peek", 0, info[0]};
    return -1;
oserr:
    free(out);
    *why = (struct dump_fail){step, errno, 0};
    return -1;
}

static void repair_off_quietly(int fd)
{
    int saved = errno;
    opt_int(fd, IPPROTO_TCP, TCP_REPAIR, REPAIR_OFF_NO_WP);
    errno = saved;
}

/* set (on) or clear the `mute` bits of the socket's SO_MARK, keeping any others (a program's
 * own mark): the node's OUTPUT drops what a muted socket sends. A socket in repair mode is
 * not silent (its delayed-ACK and retransmission timers still send; clustercore.fastpath
 * MUTE_MARK says what that did to the destination's copy), so a dumped one is muted. */
static int set_mute(int fd, unsigned int mute, int on)
{
    unsigned int mark = 0, want;
    socklen_t len = sizeof mark;
    if (getsockopt(fd, SOL_SOCKET, SO_MARK, &mark, &len) < 0) return -1;
    want = on ? (mark | mute) : (mark & ~mute);
    if (want == mark) return 0;
    return setsockopt(fd, SOL_SOCKET, SO_MARK, &want, sizeof want);
}

/* dump_many(fds, names[, (TcpConnState, TcpWindow, ip_text, keep_max)[, mute]]) -> list[bytes]:
 * repair mode on for each socket and its record. With the 4-tuple, a list of TcpConnState
 * instead of records. `mute` (a mark bit, 0: none) is set in each socket's SO_MARK once it
 * is read (set_mute), after the ACK the dump sends where one is owed (dump_one).
 * The syscalls run with the interpreter's lock released (two threads can dump two lists
 * at once: nodeshim.repairc does at 10,000 connections); the records and objects are
 * built after, with it.
 * All or none: on failure every socket of the list already touched (and the failing one,
 * if repair mode went on) is unmuted and leaves repair mode without a window probe, as
 * tcprepair.py. */
static PyObject *py_dump_many(PyObject *self, PyObject *args)
{
    PyObject *fds_in, *names_in, *fds = NULL, *names = NULL, *out = NULL, *types = Py_None;
    Py_ssize_t n, i, done = 0, failed_at = -1;
    int *fdv = NULL;
    const char **nmv = NULL;
    Py_ssize_t *nlv = NULL;
    uint8_t **bufv = NULL;
    size_t *lenv = NULL;
    struct conn *cv = NULL;
    struct dump_fail why = {0};
    unsigned int mute = 0;
    struct builder b = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "OO|OI", &fds_in, &names_in, &types, &mute)) return NULL;
    if (types != Py_None) {
        PyObject *ct, *wt;
        if (!PyArg_ParseTuple(types, "OOOn", &ct, &wt, &b.ip_text, &b.keep_max)) return NULL;
        if (!PyType_Check(ct) || !PyType_Check(wt) || !PyCallable_Check(b.ip_text)) {
            PyErr_SetString(PyExc_TypeError, "dump_many: (TcpConnState, TcpWindow, ip_text, keep_max)");
            return NULL;
        }
        b.conn_t = (PyTypeObject *)ct;
        b.win_t = (PyTypeObject *)wt;
        if (!(b.ips = PyDict_New())) return NULL;
    }
    if (!(fds = PySequence_Fast(fds_in, "fds must be a sequence"))) goto out;
    if (!(names = PySequence_Fast(names_in, "names must be a sequence"))) goto out;
    n = PySequence_Fast_GET_SIZE(fds);
    if (PySequence_Fast_GET_SIZE(names) != n) {
        PyErr_SetString(PyExc_ValueError, "dump_many: as many names as sockets");
        goto out;
    }
    fdv = PyMem_New(int, n ? n : 1);
    nmv = PyMem_New(const char *, n ? n : 1);
    nlv = PyMem_New(Py_ssize_t, n ? n : 1);
    lenv = PyMem_New(size_t, n ? n : 1);
    cv = PyMem_New(struct conn, n ? n : 1);
    bufv = PyMem_Calloc(n ? n : 1, sizeof *bufv);
    if (!fdv || !nmv || !nlv || !lenv || !cv || !bufv) { PyErr_NoMemory(); goto out; }
    for (i = 0; i < n; i++) {
        PyObject *nm = PySequence_Fast_GET_ITEM(names, i);
        fdv[i] = as_int(PySequence_Fast_GET_ITEM(fds, i));
        if (fdv[i] == -1 && PyErr_Occurred()) goto out;
        if (nm != Py_None && (!PyBytes_Check(nm) || PyBytes_GET_SIZE(nm) > 255)) {
            PyErr_SetString(PyExc_ValueError, "dump_many: a name is None or bytes of at most 255");
            goto out;
        }
        /* the bytes stay alive (`names` holds them) and cannot change: read without the lock */
        nmv[i] = nm == Py_None ? NULL : PyBytes_AS_STRING(nm);
        nlv[i] = nm == Py_None ? 0 : PyBytes_GET_SIZE(nm);
    }
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        if (opt_int(fdv[i], IPPROTO_TCP, TCP_REPAIR, REPAIR_ON) < 0) {
            why = (struct dump_fail){"TCP_REPAIR on", errno, 0};
            failed_at = i;
            break;
        }
        done = i + 1;
        if (dump_one(fdv[i], nmv[i], nlv[i], &cv[i], &bufv[i], &lenv[i], &why) < 0) {
            failed_at = i;
            break;
        }
        /* muted after the reads: the ACK dump_one may send must leave the node */
        if (mute && set_mute(fdv[i], mute, 1) < 0) {
            why = (struct dump_fail){"SO_MARK", errno, 0};
            failed_at = i;
            break;
        }
    }
    if (failed_at >= 0) {
        for (i = 0; i < done; i++) {
            if (mute) set_mute(fdv[i], mute, 0);
            repair_off_quietly(fdv[i]);
        }
    }
    Py_END_ALLOW_THREADS
    if (failed_at >= 0) {
        fail(failed_at, why.step, why.err, why.state);
        goto out;
    }
    if (!(out = PyList_New(n))) goto rollback;
    for (i = 0; i < n; i++) {
        PyObject *rec = PyBytes_FromStringAndSize((const char *)bufv[i], (Py_ssize_t)lenv[i]);
        struct conn c = cv[i];
        if (!rec) goto rollback;
        {   /* the pointers into the record, now that it is a bytes object */
            const uint8_t *base = (const uint8_t *)PyBytes_AS_STRING(rec);
            c.name = base + (c.name - bufv[i]);
            c.rq = base + (c.rq - bufv[i]);
            c.sq = base + (c.sq - bufv[i]);
        }
        if (b.conn_t) {
            PyObject *st = make_state(&b, &c, rec);
            Py_DECREF(rec);
            if (!st) goto rollback;
            rec = st;
        }
        PyList_SET_ITEM(out, i, rec);
    }
    goto out;
rollback: /* out of memory building the objects: the sockets go back as they were */
    for (i = 0; i < done; i++) {
        int saved = errno;
        if (mute) set_mute(fdv[i], mute, 0);
        errno = saved;
        repair_off_quietly(fdv[i]);
    }
    Py_CLEAR(out);
out:
    if (bufv)
        for (i = 0; i < n; i++) free(bufv[i]);
    PyMem_Free(bufv);
    PyMem_Free(cv);
    PyMem_Free(lenv);
    PyMem_Free(nlv);
    PyMem_Free(nmv);
    Py_XDECREF(b.ips);
    PyMem_Free(fdv);
    Py_XDECREF(fds);
    Py_XDECREF(names);
    return out;
}

/* ------------------------------------------------------------------ restore */

static socklen_t make_sockaddr(int family, const uint8_t ip[16], uint16_t port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (family == 6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        memcpy(&a->sin6_addr, ip, 16);
        a->sin6_port = htons(port);
        return sizeof *a;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    memcpy(&a->sin_addr, ip, 4);
    a->sin_port = htons(port);
    return sizeof *a;
}

/* force a buffer size only when `need` queued bytes would not fit (forcing locks it) */
static int grow_buffer(int fd, int get_opt, int force_opt, uint32_t need)
{
    int have = 0;
    if (get_int(fd, SOL_SOCKET, get_opt, &have) < 0) return -1;
    if ((int64_t)have < 2 * (int64_t)need + 2 * BUF_SLACK)
        return opt_int(fd, SOL_SOCKET, force_opt, (int)(need + BUF_SLACK));
    return 0;
}

/* write to the selected repair queue, halving the piece on ENOMEM/EAGAIN (as libsoccr) */
static int write_queue(int fd, const uint8_t *data, size_t total)
{
    size_t off = 0, chunk = total;
    int rounds = 0;
    while (off < total) {
        size_t piece = total - off < chunk ? total - off : chunk;
        ssize_t sent = send(fd, data + off, piece, MSG_DONTWAIT);
        if (sent < 0) {
            if ((errno == ENOMEM || errno == EAGAIN) && chunk > 1024) { chunk /= 2; continue; }
            return -1;
        }
        if (sent == 0 || ++rounds > 1 << 24) { errno = EIO; return -1; }
        off += (size_t)sent;
    }
    return 0;
}

/* what a socket has had done already (tcprepair's pool: REPAIRED, BOUND) */
#define PREP_REPAIRED 1
#define PREP_BOUND 2

/* everything up to (not including) repair off: no packet leaves the node here. Runs
 * without the interpreter's lock: a failure is written to *why, not raised. */
static int restore_one(int fd, const struct conn *c, int prepared, struct dump_fail *why)
{
    const char *step = "TCP_REPAIR on";
    struct sockaddr_storage ss;
    socklen_t sl;
    uint32_t opts[8];
    int nopt = 0;
    if (!(prepared & PREP_REPAIRED) && opt_int(fd, IPPROTO_TCP, TCP_REPAIR, REPAIR_ON) < 0) goto oserr;
    if (c->rlen) {
        step = "SO_RCVBUFFORCE";
        if (grow_buffer(fd, SO_RCVBUF, SO_RCVBUFFORCE, c->rlen) < 0) goto oserr;
    }
    step = "bind";
    if (!(prepared & PREP_BOUND)) {
        sl = make_sockaddr(c->family, c->lip, c->lport, &ss);
        if (bind(fd, (struct sockaddr *)&ss, sl) < 0) goto oserr;
    }
    step = "TCP_QUEUE_SEQ";
    if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_RECV) < 0) goto oserr;
    if (opt_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, (int)(c->recv_seq - c->rlen)) < 0) goto oserr;
    if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_SEND) < 0) goto oserr;
    if (opt_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, (int)(c->send_seq - c->slen)) < 0) goto oserr;
    if (c->mss >= MIN_MSS) {
        step = "TCP_MAXSEG";
        if (opt_int(fd, IPPROTO_TCP, TCP_MAXSEG, c->mss) < 0) goto oserr;
    }
    step = "connect";
    sl = make_sockaddr(c->family, c->rip, c->rport, &ss);
    if (connect(fd, (struct sockaddr *)&ss, sl) < 0) goto oserr;
    step = "TCP_REPAIR_OPTIONS";
    if (c->flags & F_SACK) { opts[nopt++] = KIND_SACK_PERM; opts[nopt++] = 0; }
    if (c->flags & F_WS) { opts[nopt++] = KIND_WINDOW; opts[nopt++] = c->sws | (uint32_t)c->rws << 16; }
    if (c->flags & F_TS) { opts[nopt++] = KIND_TIMESTAMP; opts[nopt++] = 0; }
    opts[nopt++] = KIND_MSS;
    opts[nopt++] = c->mss;
    if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_OPTIONS, opts, nopt * sizeof opts[0]) < 0) goto oserr;
    if (c->flags & F_TS) {
        step = "TCP_TIMESTAMP";
        if (setsockopt(fd, IPPROTO_TCP, TCP_TIMESTAMP, &c->tsval, sizeof c->tsval) < 0) goto oserr;
    }
    if (c->rlen) {
        step = "receive queue refill";
        if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_RECV) < 0) goto oserr;
        if (write_queue(fd, c->rq, c->rlen) < 0) goto oserr;
    }
    if (c->slen) {
        uint32_t unacked = c->slen - c->unsent;
        step = "SO_SNDBUFFORCE";
        if (grow_buffer(fd, SO_SNDBUF, SO_SNDBUFFORCE, c->slen) < 0) goto oserr;
        if (unacked) {
            step = "send queue refill";
            if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, Q_SEND) < 0) goto oserr;
            if (write_queue(fd, c->sq, unacked) < 0) goto oserr;
        }
    }
    step = "TCP_REPAIR_WINDOW";
    if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, &c->w, sizeof c->w) < 0) goto oserr;
    return 0;
oserr:
    *why = (struct dump_fail){step, errno, 0};
    return -1;
}

/* read (fd, family, record[, prepared]) items: fds into fdv, what was done to each
 * socket already into prepv (0 without it), records parsed into cv */
static int parse_items(PyObject *items, Py_ssize_t n, int *fdv, int *prepv, struct conn *cv, Py_buffer *bufs,
                       Py_ssize_t *nbufs)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, i);
        int family;
        const char *why;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 3 || PyTuple_GET_SIZE(item) > 4) {
            PyErr_SetString(PyExc_TypeError, "restore_many: items are (fd, family, record[, prepared]) tuples");
            return -1;
        }
        fdv[i] = as_int(PyTuple_GET_ITEM(item, 0));
        if (fdv[i] == -1 && PyErr_Occurred()) return -1;
        family = as_int(PyTuple_GET_ITEM(item, 1));
        if (family == -1 && PyErr_Occurred()) return -1;
        prepv[i] = 0;
        if (PyTuple_GET_SIZE(item) == 4) {
            prepv[i] = as_int(PyTuple_GET_ITEM(item, 3));
            if (prepv[i] == -1 && PyErr_Occurred()) return -1;
            if (prepv[i] & ~(PREP_REPAIRED | PREP_BOUND)) {
                PyErr_SetString(PyExc_ValueError, "restore_many: prepared is a mask of 1 (repaired) and 2 (bound)");
                return -1;
            }
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 2), &bufs[i], PyBUF_SIMPLE) < 0) return -1;
        *nbufs = i + 1;
        if (parse_record(bufs[i].buf, (size_t)bufs[i].len, family, &cv[i], &why) < 0) {
            PyErr_Format(PyExc_ValueError, "packed connection %zd: %s", i, why);
            return -1;
        }
    }
    return 0;
}

/* restore_many(items[, unmute]) -> None: items are (fd, family, record[, prepared]); each fd
 * a new TCP socket of that family (made in the right namespace by the caller); prepared
 * (default 0) says it is in repair mode already (1) and bound to the record's local
 * address already (2): those calls are skipped. Every record is
 * parsed and checked before the first syscall (ValueError: nothing was touched). Leaves
 * every socket in repair mode; on RepairError the caller discards them all (repair on,
 * close). `unmute` (a mark bit, 0: none) is cleared from each socket's SO_MARK first: a
 * socket criu made carries the options criu dumped, and that included the mute of our
 * dump (set_mute). */
static PyObject *py_restore_many(PyObject *self, PyObject *args)
{
    PyObject *items_in, *items = NULL, *ret = NULL;
    Py_ssize_t n, i, nbufs = 0, failed_at = -1;
    int *fdv = NULL, *prepv = NULL;
    struct conn *cv = NULL;
    Py_buffer *bufs = NULL;
    unsigned int unmute = 0;
    struct dump_fail why = {NULL, 0, 0};
    (void)self;
    if (!PyArg_ParseTuple(args, "O|I", &items_in, &unmute)) return NULL;
    if (!(items = PySequence_Fast(items_in, "restore_many: a sequence of items"))) return NULL;
    n = PySequence_Fast_GET_SIZE(items);
    fdv = PyMem_New(int, n ? n : 1);
    prepv = PyMem_New(int, n ? n : 1);
    cv = PyMem_New(struct conn, n ? n : 1);
    bufs = PyMem_New(Py_buffer, n ? n : 1);
    if (!fdv || !prepv || !cv || !bufs) { PyErr_NoMemory(); goto out; }
    if (parse_items(items, n, fdv, prepv, cv, bufs, &nbufs) < 0) goto out;
    /* the records point into `bufs`, held until the end: read without the lock, so that
     * two halves of a list restore on two cores (nodeshim.repairc.restore_many) */
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        if (unmute && set_mute(fdv[i], unmute, 0) < 0) {
            why = (struct dump_fail){"SO_MARK", errno, 0};
            failed_at = i;
            break;
        }
        if (restore_one(fdv[i], &cv[i], prepv[i], &why) < 0) {
            failed_at = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed_at >= 0) {
        fail(failed_at, why.step, why.err, why.state);
        goto out;
    }
    ret = Py_NewRef(Py_None);
out:
    for (i = 0; i < nbufs; i++) PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    PyMem_Free(cv);
    PyMem_Free(prepv);
    PyMem_Free(fdv);
    Py_XDECREF(items);
    return ret;
}

/* check_record(record, family) -> None or ValueError: the parser alone (tests, fuzzing) */
static PyObject *py_check_record(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    int family;
    struct conn c;
    const char *why;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*i", &buf, &family)) return NULL;
    int rc = parse_record(buf.buf, (size_t)buf.len, family, &c, &why);
    PyBuffer_Release(&buf);
    if (rc < 0) {
        PyErr_Format(PyExc_ValueError, "packed connection: %s", why);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ thaw and close */

/* thaw_many(items) -> int: items are (fd, never-sent tail or None, probe). Repair off
 * (with the kernel's window probe when probe is true, else TCP_REPAIR_OFF_NO_WP:
 * sockstate.TcpConnState.needs_window_probe says when which), the tail sent non-blocking,
 * SO_REUSEADDR; in order, the first failure raises (the rest stay in repair mode), as
 * tcprepair.py. Returns how many window probes were sent. */
static PyObject *py_thaw_many(PyObject *self, PyObject *args)
{
    PyObject *items_in, *items;
    Py_ssize_t n, i, probes = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &items_in)) return NULL;
    if (!(items = PySequence_Fast(items_in, "thaw_many: a sequence of items"))) return NULL;
    n = PySequence_Fast_GET_SIZE(items);
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, i), *tail;
        Py_buffer buf = {0};
        int fd, probe, err = 0;
        const char *step = "TCP_REPAIR off";
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_TypeError, "thaw_many: items are (fd, tail, probe) tuples");
            goto bad;
        }
        fd = as_int(PyTuple_GET_ITEM(item, 0));
        if (fd == -1 && PyErr_Occurred()) goto bad;
        if ((probe = PyObject_IsTrue(PyTuple_GET_ITEM(item, 2))) < 0) goto bad;
        tail = PyTuple_GET_ITEM(item, 1);
        if (tail != Py_None && PyObject_GetBuffer(tail, &buf, PyBUF_SIMPLE) < 0) goto bad;
        if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR, probe ? REPAIR_OFF : REPAIR_OFF_NO_WP) < 0) {
            err = errno;
        } else if (buf.len) {
            const uint8_t *p = buf.buf;
            Py_ssize_t off = 0;
            step = "send never-sent tail";
            while (off < buf.len) { /* bounded: every round progresses or gives up */
                ssize_t sent = send(fd, p + off, buf.len - off, MSG_DONTWAIT);
                if (sent <= 0) { err = sent < 0 && errno != EAGAIN ? errno : EAGAIN; break; }
                off += sent;
            }
        }
        if (!err) {
            step = "SO_REUSEADDR";
            if (opt_int(fd, SOL_SOCKET, SO_REUSEADDR, 1) < 0) err = errno;
        }
        if (tail != Py_None) PyBuffer_Release(&buf);
        if (err) {
            fail(i, step, err, 0);
            goto bad;
        }
        probes += probe;
    }
    Py_DECREF(items);
    return PyLong_FromSsize_t(probes);
bad:
    Py_DECREF(items);
    return NULL;
}

/* close_many(fds) -> list of (index, step, errno) for the sockets that failed: every
 * socket is tried. Each: repair on, disconnect (connect to AF_UNSPEC: in repair mode the
 * connection is dropped without a packet), repair off without a window probe. The caller
 * closes its descriptors (it owns the socket objects). */
static PyObject *py_close_many(PyObject *self, PyObject *args)
{
    PyObject *fds_in, *fds, *failed;
    Py_ssize_t n, i;
    struct sockaddr unspec;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &fds_in)) return NULL;
    if (!(fds = PySequence_Fast(fds_in, "close_many: a sequence of fds"))) return NULL;
    if (!(failed = PyList_New(0))) { Py_DECREF(fds); return NULL; }
    memset(&unspec, 0, sizeof unspec);
    unspec.sa_family = AF_UNSPEC;
    n = PySequence_Fast_GET_SIZE(fds);
    for (i = 0; i < n; i++) {
        const char *step = NULL;
        int fd = as_int(PySequence_Fast_GET_ITEM(fds, i));
        if (fd == -1 && PyErr_Occurred()) goto bad;
        if (opt_int(fd, IPPROTO_TCP, TCP_REPAIR, REPAIR_ON) < 0)
            step = "close_silently: TCP_REPAIR on";
        else if (connect(fd, &unspec, sizeof unspec) < 0)
            step = "close_silently: disconnect";
        else
            repair_off_quietly(fd);
        if (step) {
            PyObject *t = Py_BuildValue("(nsi)", i, step, errno);
            if (!t || PyList_Append(failed, t) < 0) { Py_XDECREF(t); goto bad; }
            Py_DECREF(t);
        }
    }
    Py_DECREF(fds);
    return failed;
bad:
    Py_DECREF(fds);
    Py_DECREF(failed);
    return NULL;
}

static PyMethodDef methods[] = {
    {"dump_many", py_dump_many, METH_VARARGS, "dump_many(fds, names[, types[, mute]]) -> list of packed records"},
    {"restore_many", py_restore_many, METH_VARARGS, "restore_many([(fd, family, record)][, unmute]) -> None"},
    {"thaw_many", py_thaw_many, METH_VARARGS, "thaw_many([(fd, tail, probe)]) -> window probes sent"},
    {"close_many", py_close_many, METH_VARARGS, "close_many(fds) -> [(index, step, errno)]"},
    {"check_record", py_check_record, METH_VARARGS, "check_record(record, family): ValueError if bad"},
    {"unpack_many", py_unpack_many, METH_VARARGS, "unpack_many(data, family, types) -> list of TcpConnState"},
    {"take_many", py_take_many, METH_VARARGS, "take_many(pidfd, fds, disconnect) -> [(fd, ours, ino, state, family)]"},
    {"warm_fds", py_warm_fds, METH_VARARGS, "warm_fds(pid) -> int: /proc/PID/fd and fdinfo entries made before the freeze"},
    {"sockopts_many", py_sockopts_many, METH_VARARGS, "sockopts_many(fds, families, mute) -> OPTS_SIZE bytes each"},
    {"set_sockopts_many", py_set_sockopts_many, METH_VARARGS, "set_sockopts_many(fds, families, blob) -> None"},
    {"new_sockets", py_new_sockets, METH_VARARGS, "new_sockets(families) -> [fd]"},
    {"tracee_attach", py_tracee_attach, METH_VARARGS, "tracee_attach(pid) -> state"},
    {"tracee_syscall", py_tracee_syscall, METH_VARARGS, "tracee_syscall(pid, state, nr, *args) -> result"},
    {"tracee_detach", py_tracee_detach, METH_VARARGS, "tracee_detach(pid, state) -> None"},
    {"vm_write", py_vm_write, METH_VARARGS, "vm_write(pid, addr, data) -> None"},
    {"vm_read", py_vm_read, METH_VARARGS, "vm_read(pid, addr, n) -> bytes"},
    {"epoll_ctl_as", py_epoll_ctl_as, METH_VARARGS, "epoll_ctl_as(epfd, op, targets, ours, events, data) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "nodeshim._repair",
    "TCP_REPAIR per-connection loops in C (see nodeshim/_repair.c and nodeshim.tcprepair).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__repair(void)
{
    PyObject *m;
    if (repair_format_init() < 0) return NULL;
    m = PyModule_Create(&module);
    if (!m) return NULL;
    RepairError = PyErr_NewException("nodeshim._repair.RepairError", NULL, NULL);
    if (!RepairError || PyModule_AddObject(m, "RepairError", Py_NewRef(RepairError)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* ABI: what nodeshim/repairc.py expects of this module's calls; bump it with them */
    if (PyModule_AddIntConstant(m, "HEAD4", HEAD4) < 0 || PyModule_AddIntConstant(m, "HEAD6", HEAD6) < 0
        || PyModule_AddIntConstant(m, "OPTS_SIZE", repair_opts_size()) < 0
        || PyModule_AddIntConstant(m, "ABI", 8) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
