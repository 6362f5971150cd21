/* nodeshim/_repair_take.c: take_many, the TCP sockets of another process in one call
 * (nodeshim.criutcp: a frozen program's connections dumped beside criu, and their
 * rebuilding in the sockets criu's restore made).
 *
 * Why in C: per socket pidfd_getfd, fstat, getsockopt(SO_DOMAIN, SO_TYPE, SO_PROTOCOL) and
 * TCP_INFO's state. In Python (pidfd.take_sockets, then socket.socket's family and type)
 * that was 50-100 us per socket on this VM, 1,000 connections inside the freeze; and the
 * node agent's packet loop, which runs meanwhile, waited for the interpreter. Here the
 * loop runs with the interpreter released.
 *
 * take_many(pidfd, target_fds, disconnect[, fdinfo_pid]) -> [(target_fd, our_fd, inode, tcp_state, family, mss, flags)]
 *   for each target fd that is a TCP socket (AF_INET or AF_INET6, SOCK_STREAM,
 *   IPPROTO_TCP); any other descriptor is closed again, one the target closed meanwhile
 *   (EBADF) is skipped. mss: TCP_MAXSEG of an ESTABLISHED one, else 0. disconnect: also connect(AF_UNSPEC) each one (tcp_disconnect: a
 *   socket criu restored "closed" and shut down becomes a clean unconnected one); the
 *   caller passes this only for sockets that are not connected. The caller owns the
 *   returned descriptors. flags: with fdinfo_pid (the pidfd's pid), an ESTABLISHED one's
 *   `flags:` of /proc/PID/fdinfo/FD (its file's flags, O_CLOEXEC the descriptor's), else -1
 *   (-1 too for one with a signal owner, F_SETOWN: the file's, read on our duplicate). On an error every descriptor taken is closed and OSError raised
 *   (its filename says which target fd and which step).
 *
 * warm_fds(pid) -> int: before the freeze, list /proc/PID/fd and open (and close) each
 *   descriptor's /proc/PID/fdinfo entry once, so that take_many inside the freeze finds
 *   the kernel's /proc entries made: a first listing of 1,000 descriptors took 3.0 ms on
 *   this VM, a second 0.5; a first fdinfo read 7.5 us, a later one 5.3. Changes nothing
 *   of the process. Returns how many entries it opened; OSError if the process is gone.
 */
#include "_repair.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <dirent.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

struct taken {
    int target, fd, state, family, mss;
    long flags;
    unsigned long long ino;
};

PyObject *py_take_many(PyObject *self, PyObject *args)
{
    int pidfd, disconnect, err = 0, fdinfo_pid = 0, fdinfo_dir = -1;
    PyObject *targets_in, *targets, *out = NULL;
    Py_ssize_t n, i, got = 0;
    int *tv = NULL;
    struct taken *tk = NULL;
    const char *step = NULL;
    int bad_target = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "iOp|i", &pidfd, &targets_in, &disconnect, &fdinfo_pid)) return NULL;
    if (!(targets = PySequence_Fast(targets_in, "target fds must be a sequence"))) return NULL;
    n = PySequence_Fast_GET_SIZE(targets);
    tv = PyMem_New(int, n ? n : 1);
    tk = PyMem_New(struct taken, n ? n : 1);
    if (!tv || !tk) { PyErr_NoMemory(); goto out; }
    for (i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(targets, i));
        if (v == -1 && PyErr_Occurred()) goto out;
        if (v < 0 || v > 0x7fffffff) { PyErr_SetString(PyExc_ValueError, "take_many: bad fd"); goto out; }
        tv[i] = (int)v;
    }
    Py_BEGIN_ALLOW_THREADS
    if (fdinfo_pid > 0) {
        char dir[48];
        snprintf(dir, sizeof dir, "/proc/%d/fdinfo", fdinfo_pid);
        fdinfo_dir = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fdinfo_dir < 0) { err = errno; step = "open fdinfo"; }
    }
    for (i = 0; !err && i < n; i++) {
        struct stat st;
        struct tcp_info ti;
        socklen_t len;
        int fd, dom = 0, type = 0, proto = 0;
        fd = (int)syscall(SYS_pidfd_getfd, pidfd, tv[i], 0);
        if (fd < 0) {
            if (errno == EBADF) continue;
            err = errno; step = "pidfd_getfd"; bad_target = tv[i];
            break;
        }
        if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode)) { close(fd); continue; }
        len = sizeof dom;
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &len) < 0 || (dom != AF_INET && dom != AF_INET6)) {
            close(fd); continue;
        }
        len = sizeof type;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_STREAM) { close(fd); continue; }
        len = sizeof proto;
        if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) < 0 || proto != IPPROTO_TCP) {
            close(fd); continue;
        }
        len = sizeof ti;
        memset(&ti, 0, sizeof ti);
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0) {
            err = errno; step = "TCP_INFO"; bad_target = tv[i];
            close(fd);
            break;
        }
        tk[got].mss = 0;
        len = sizeof tk[got].mss;
        if (ti.tcpi_state == STATE_ESTABLISHED && getsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &tk[got].mss, &len) < 0) {
            err = errno; step = "TCP_MAXSEG"; bad_target = tv[i];
            close(fd);
            break;
        }
        if (disconnect) {
            struct sockaddr sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_family = AF_UNSPEC;
            if (connect(fd, &sa, sizeof sa) < 0) {
                err = errno; step = "AF_UNSPEC connect"; bad_target = tv[i];
                close(fd);
                break;
            }
        }
        tk[got].flags = -1;
        if (fdinfo_dir >= 0 && ti.tcpi_state == STATE_ESTABLISHED) {  /* the open file's flags, O_CLOEXEC the fd's */
            char name[16], buf[256], *p;
            ssize_t r = -1;
            int f;
            snprintf(name, sizeof name, "%d", tv[i]);
            f = openat(fdinfo_dir, name, O_RDONLY | O_CLOEXEC);
            if (f >= 0) { r = read(f, buf, sizeof buf - 1); close(f); }
            p = r > 0 ? (buf[r] = 0, strstr(buf, "flags:")) : NULL;
            if (!p) {
                err = r < 0 ? errno : EPROTO; step = "fdinfo flags"; bad_target = tv[i];
                close(fd);
                break;
            }
            tk[got].flags = strtol(p + 6, NULL, 8);
            {  /* a signal owner (F_SETOWN): criu carries that, we do not: -1 leaves it to criu */
                struct f_owner_ex owner;
                memset(&owner, 0, sizeof owner);
                if (fcntl(fd, F_GETOWN_EX, &owner) < 0 || owner.pid != 0) tk[got].flags = -1;
            }
        }
        tk[got].target = tv[i];
        tk[got].fd = fd;
        tk[got].state = ti.tcpi_state;
        tk[got].family = dom;
        tk[got].ino = (unsigned long long)st.st_ino;
        got++;
    }
    if (err)
        for (i = 0; i < got; i++) close(tk[i].fd);
    if (fdinfo_dir >= 0) close(fdinfo_dir);
    Py_END_ALLOW_THREADS
    if (err) {
        char what[64];
        snprintf(what, sizeof what, "%s of fd %d", step, bad_target);
        errno = err;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, what);
        goto out;
    }
    if (!(out = PyList_New(got))) goto close_all;
    for (i = 0; i < got; i++) {
        PyObject *t = Py_BuildValue("(iiKiiil)", tk[i].target, tk[i].fd, tk[i].ino, tk[i].state, tk[i].family,
                                     tk[i].mss, tk[i].flags);
        if (!t) { Py_CLEAR(out); goto close_all; }
        PyList_SET_ITEM(out, i, t);
    }
    goto out;
close_all:
    for (i = 0; i < got; i++) close(tk[i].fd);
out:
    PyMem_Free(tv);
    PyMem_Free(tk);
    Py_DECREF(targets);
    return out;
}

PyObject *py_warm_fds(PyObject *self, PyObject *args)
{
    int pid, n = 0, err = 0, info = -1;
    char path[48];
    DIR *dir = NULL;
    struct dirent *e;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &pid)) return NULL;
    if (pid <= 0) { PyErr_SetString(PyExc_ValueError, "warm_fds: bad pid"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    dir = opendir(path);
    if (dir) {
        snprintf(path, sizeof path, "/proc/%d/fdinfo", pid);
        info = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    if (!dir || info < 0) {
        err = errno;
    } else {
        while ((e = readdir(dir)) != NULL) {  /* readdir makes the fd/N entries */
            int f;
            if (e->d_name[0] == '.') continue;
            f = openat(info, e->d_name, O_RDONLY | O_CLOEXEC);  /* and this the fdinfo/N one */
            if (f >= 0) { close(f); n++; }  /* one closed meanwhile: nothing to warm */
        }
    }
    if (info >= 0) close(info);
    if (dir) closedir(dir);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    return PyLong_FromLong(n);
}
