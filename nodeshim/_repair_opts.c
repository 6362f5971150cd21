/* nodeshim/_repair_opts.c: a connection's socket options, read and set in bulk, and new
 * sockets made in bulk (nodeshim.criutcp with the connections hidden from criu:
 * nodeshim/fdmove.py).
 *
 * Why: criu dumps some 30 options of every socket (getsockopt one by one) and sets them
 * again in its restore. When the connections are hidden from criu it sees none of them,
 * so we carry them: the same options criu's dump_socket_opts, dump_ip_opts and
 * dump_tcp_opts read, read by the thread that dumps the connections beside criu, and set
 * on the destination's new sockets while criu restores the program.
 *
 * sockopts_many(fds, families, mute) -> bytes: OPTS_SIZE bytes per socket, network order
 *   int32 fields in the order of `fields` below. mute: a mark bit our own dump sets
 *   (cleared from the SO_MARK read, in case it was set already). An option the kernel does
 *   not know (ENOPROTOOPT, ENOTSUPP: SO_BUF_LOCK before Linux 5.14) reads as UNSET.
 * set_sockopts_many(fds, families, blob) -> None: each socket gets its record's options as
 *   criu's restore_socket_opts, restore_ip_opts and restore_tcp_opts set them (the buffer
 *   sizes always, forced; the others when not zero; SO_BUF_LOCK when known). On the first
 *   failure OSError (its filename: which socket and option); the caller discards the lot.
 * new_sockets(families) -> [fd]: a new TCP socket (close-on-exec) per family (4 or 6), the
 *   caller's to close; on an error none is left and OSError is raised. (1,000 sockets:
 *   about 1 ms here, 5-6 ms made one by one as socket.socket objects.)
 */
#include "_repair.h"

#include <errno.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef SO_BUF_LOCK
#define SO_BUF_LOCK 72
#endif
#ifndef ENOTSUPP
#define ENOTSUPP 524
#endif

#define UNSET ((int32_t)0x80000000) /* the kernel did not know the option */

enum kind { PLAIN, BUF, TIMEO, LINGER };

/* family: 0 both, 4 IPv4 only, 6 IPv6 only */
static const struct field {
    int level, name, family;
    enum kind kind;
    const char *what;
} fields[] = {
    {SOL_SOCKET, SO_SNDBUF, 0, BUF, "SO_SNDBUF"},
    {SOL_SOCKET, SO_RCVBUF, 0, BUF, "SO_RCVBUF"},
    {SOL_SOCKET, SO_BUF_LOCK, 0, PLAIN, "SO_BUF_LOCK"},
    {SOL_SOCKET, SO_PRIORITY, 0, PLAIN, "SO_PRIORITY"},
    {SOL_SOCKET, SO_RCVLOWAT, 0, PLAIN, "SO_RCVLOWAT"},
    {SOL_SOCKET, SO_MARK, 0, PLAIN, "SO_MARK"},
    {SOL_SOCKET, SO_SNDTIMEO, 0, TIMEO, "SO_SNDTIMEO"}, /* two fields: seconds, microseconds */
    {SOL_SOCKET, SO_RCVTIMEO, 0, TIMEO, "SO_RCVTIMEO"},
    {SOL_SOCKET, SO_REUSEADDR, 0, PLAIN, "SO_REUSEADDR"},
    {SOL_SOCKET, SO_REUSEPORT, 0, PLAIN, "SO_REUSEPORT"},
    {SOL_SOCKET, SO_DONTROUTE, 0, PLAIN, "SO_DONTROUTE"},
    {SOL_SOCKET, SO_NO_CHECK, 0, PLAIN, "SO_NO_CHECK"},
    {SOL_SOCKET, SO_BROADCAST, 0, PLAIN, "SO_BROADCAST"},
    {SOL_SOCKET, SO_KEEPALIVE, 0, PLAIN, "SO_KEEPALIVE"},
    {SOL_SOCKET, SO_OOBINLINE, 0, PLAIN, "SO_OOBINLINE"},
    {SOL_SOCKET, SO_LINGER, 0, LINGER, "SO_LINGER"}, /* one field: the seconds when on, else -1 */
    {IPPROTO_TCP, TCP_NODELAY, 0, PLAIN, "TCP_NODELAY"},
    {IPPROTO_TCP, TCP_CORK, 0, PLAIN, "TCP_CORK"},
    {IPPROTO_TCP, TCP_KEEPCNT, 0, PLAIN, "TCP_KEEPCNT"},
    {IPPROTO_TCP, TCP_KEEPIDLE, 0, PLAIN, "TCP_KEEPIDLE"},
    {IPPROTO_TCP, TCP_KEEPINTVL, 0, PLAIN, "TCP_KEEPINTVL"},
    {SOL_IP, IP_FREEBIND, 0, PLAIN, "IP_FREEBIND"}, /* the kernel takes it on IPv6 sockets too */
    {SOL_IP, IP_PKTINFO, 4, PLAIN, "IP_PKTINFO"},
    {SOL_IP, IP_TOS, 4, PLAIN, "IP_TOS"},
    {SOL_IP, IP_TTL, 4, PLAIN, "IP_TTL"},
    {SOL_IPV6, IPV6_RECVPKTINFO, 6, PLAIN, "IPV6_RECVPKTINFO"},
};
#define NFIELDS (sizeof fields / sizeof fields[0])
#define NVALUES (NFIELDS + 2) /* the two TIMEO fields take two values each */
#define OPTS_SIZE (NVALUES * 4)

static int known(int err)
{
    return err != ENOPROTOOPT && err != ENOTSUPP && err != EOPNOTSUPP;
}

/* one socket's values (host order) into v; -1 with errno and *what on failure */
static int read_opts(int fd, int family, uint32_t mute, int32_t *v, const char **what)
{
    size_t i, k = 0;
    for (i = 0; i < NFIELDS; i++) {
        const struct field *f = &fields[i];
        socklen_t len;
        *what = f->what;
        if (f->family && f->family != family) {
            v[k++] = 0;
            if (f->kind == TIMEO) v[k++] = 0;
            continue;
        }
        if (f->kind == TIMEO) {
            struct timeval tv;
            len = sizeof tv;
            if (getsockopt(fd, f->level, f->name, &tv, &len) < 0) return -1;
            v[k++] = (int32_t)tv.tv_sec;
            v[k++] = (int32_t)tv.tv_usec;
        } else if (f->kind == LINGER) {
            struct linger l;
            len = sizeof l;
            if (getsockopt(fd, f->level, f->name, &l, &len) < 0) return -1;
            v[k++] = l.l_onoff ? l.l_linger : -1;
        } else {
            int val = 0;
            len = sizeof val;
            if (getsockopt(fd, f->level, f->name, &val, &len) < 0) {
                if (known(errno)) return -1;
                val = UNSET;
            }
            if (f->name == SO_MARK && f->level == SOL_SOCKET) val &= ~(int)mute;
            v[k++] = val;
        }
    }
    return 0;
}

static int set_int(int fd, int level, int name, int val)
{
    return setsockopt(fd, level, name, &val, sizeof val);
}

/* one socket's values (host order) set as criu restores them */
static int write_opts(int fd, int family, const int32_t *v, const char **what)
{
    size_t i, k = 0;
    for (i = 0; i < NFIELDS; i++) {
        const struct field *f = &fields[i];
        *what = f->what;
        if (f->family && f->family != family) {
            k += f->kind == TIMEO ? 2 : 1;
            continue;
        }
        if (f->kind == BUF) { /* the kernel doubles what it is given (criu: value / 2) */
            int force = f->name == SO_SNDBUF ? SO_SNDBUFFORCE : SO_RCVBUFFORCE;
            if (v[k] <= 0) { errno = EINVAL; return -1; }
            if (set_int(fd, SOL_SOCKET, force, v[k] / 2) < 0) return -1;
            k++;
        } else if (f->kind == TIMEO) {
            struct timeval tv = {.tv_sec = v[k], .tv_usec = v[k + 1]};
            if ((tv.tv_sec || tv.tv_usec) && setsockopt(fd, f->level, f->name, &tv, sizeof tv) < 0) return -1;
            k += 2;
        } else if (f->kind == LINGER) {
            struct linger l = {.l_onoff = 1, .l_linger = v[k]};
            if (v[k] >= 0 && setsockopt(fd, f->level, f->name, &l, sizeof l) < 0) return -1;
            k++;
        } else {
            int val = v[k++];
            if (val == UNSET) continue;
            if (f->name == SO_BUF_LOCK && f->level == SOL_SOCKET) { /* after the sizes, which set it */
                if (set_int(fd, f->level, f->name, val) < 0 && known(errno)) return -1;
                continue;
            }
            if (val && set_int(fd, f->level, f->name, val) < 0) return -1;
        }
    }
    return 0;
}

static int *int_list(PyObject *seq, Py_ssize_t *n, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    int *out;
    Py_ssize_t i;
    if (!fast) return NULL;
    *n = PySequence_Fast_GET_SIZE(fast);
    out = PyMem_New(int, *n ? *n : 1);
    if (!out) { Py_DECREF(fast); PyErr_NoMemory(); return NULL; }
    for (i = 0; i < *n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if ((v == -1 && PyErr_Occurred()) || v < -0x7fffffffL || v > 0x7fffffffL) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: out of range", what);
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
        out[i] = (int)v;
    }
    Py_DECREF(fast);
    return out;
}

static PyObject *fail(int err, const char *what, Py_ssize_t index)
{
    char where[64];
    snprintf(where, sizeof where, "%s of socket %zd", what, index);
    errno = err;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, where);
}

PyObject *py_sockopts_many(PyObject *self, PyObject *args)
{
    PyObject *fds_in, *families_in, *out;
    unsigned int mute;
    Py_ssize_t n, nf, i, bad = -1;
    int *fds, *fams, err = 0;
    const char *what = "";
    uint8_t *buf;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOI", &fds_in, &families_in, &mute)) return NULL;
    if (!(fds = int_list(fds_in, &n, "sockopts_many: fds"))) return NULL;
    if (!(fams = int_list(families_in, &nf, "sockopts_many: families"))) { PyMem_Free(fds); return NULL; }
    if (nf != n) {
        PyMem_Free(fds); PyMem_Free(fams);
        return PyErr_Format(PyExc_ValueError, "sockopts_many: %zd fds, %zd families", n, nf);
    }
    if (!(out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)OPTS_SIZE))) { PyMem_Free(fds); PyMem_Free(fams); return NULL; }
    buf = (uint8_t *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        int32_t v[NVALUES];
        size_t k;
        if (read_opts(fds[i], fams[i], mute, v, &what) < 0) { err = errno; bad = i; break; }
        for (k = 0; k < NVALUES; k++) {
            uint32_t be = htonl((uint32_t)v[k]);
            memcpy(buf + (size_t)i * OPTS_SIZE + k * 4, &be, 4);
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(fds);
    PyMem_Free(fams);
    if (err) { Py_DECREF(out); return fail(err, what, bad); }
    return out;
}

PyObject *py_set_sockopts_many(PyObject *self, PyObject *args)
{
    PyObject *fds_in, *families_in;
    Py_buffer blob;
    Py_ssize_t n, nf, i, bad = -1;
    int *fds, *fams, err = 0;
    const char *what = "";
    (void)self;
    if (!PyArg_ParseTuple(args, "OOy*", &fds_in, &families_in, &blob)) return NULL;
    fds = int_list(fds_in, &n, "set_sockopts_many: fds");
    fams = fds ? int_list(families_in, &nf, "set_sockopts_many: families") : NULL;
    if (!fds || !fams) goto bad_args;
    if (nf != n || blob.len != n * (Py_ssize_t)OPTS_SIZE) {
        PyErr_Format(PyExc_ValueError, "set_sockopts_many: %zd fds, %zd families, %zd bytes of options",
                     n, nf, blob.len);
        goto bad_args;
    }
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        int32_t v[NVALUES];
        size_t k;
        for (k = 0; k < NVALUES; k++) {
            uint32_t be;
            memcpy(&be, (const uint8_t *)blob.buf + (size_t)i * OPTS_SIZE + k * 4, 4);
            v[k] = (int32_t)ntohl(be);
        }
        if (write_opts(fds[i], fams[i], v, &what) < 0) { err = errno; bad = i; break; }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&blob);
    PyMem_Free(fds);
    PyMem_Free(fams);
    if (err) return fail(err, what, bad);
    Py_RETURN_NONE;
bad_args:
    PyBuffer_Release(&blob);
    PyMem_Free(fds);
    PyMem_Free(fams);
    return NULL;
}

PyObject *py_new_sockets(PyObject *self, PyObject *args)
{
    PyObject *families_in, *out = NULL;
    Py_ssize_t n, i, made = 0;
    int *fams, *fds = NULL, err = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &families_in)) return NULL;
    if (!(fams = int_list(families_in, &n, "new_sockets: families"))) return NULL;
    for (i = 0; i < n; i++)
        if (fams[i] != 4 && fams[i] != 6) {
            PyMem_Free(fams);
            return PyErr_Format(PyExc_ValueError, "new_sockets: family %d", fams[i]);
        }
    if (!(fds = PyMem_New(int, n ? n : 1))) { PyMem_Free(fams); return PyErr_NoMemory(); }
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        int fd = socket(fams[i] == 6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
        if (fd < 0) { err = errno; break; }
        fds[made++] = fd;
    }
    if (err)
        for (i = 0; i < made; i++) close(fds[i]);
    Py_END_ALLOW_THREADS
    PyMem_Free(fams);
    if (err) {
        PyMem_Free(fds);
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "socket");
    }
    if ((out = PyList_New(made))) {
        for (i = 0; i < made; i++) {
            PyObject *v = PyLong_FromLong(fds[i]);
            if (!v) { Py_CLEAR(out); break; }
            PyList_SET_ITEM(out, i, v);
        }
    }
    if (!out)
        for (i = 0; i < made; i++) close(fds[i]);
    PyMem_Free(fds);
    return out;
}

int repair_opts_size(void)
{
    return (int)OPTS_SIZE;
}
