/* nodeshim/_repair_inject.c: a stopped program's descriptors taken out of it and put back
 * (nodeshim.fdmove: a copied image's connections hidden from criu).
 *
 * Why: criu spends about 30 us per socket descriptor in a dump (the parasite's batches,
 * fdinfo, ~30 getsockopt, a kcmp per epoll target) and about 20 us in a restore; nginx with
 * 1,000 connections spends some 60 ms of its freeze there, for sockets whose state we move
 * ourselves anyway (nodeshim.criutcp). So the connections leave the stopped program before
 * criu looks (epoll_ctl DEL, then close in the program) and come back after criu's restore
 * (epoll_ctl ADD, then the sockets received into the program at their very numbers).
 *
 * tracee_attach(pid) -> state: PTRACE_SEIZE and PTRACE_INTERRUPT the (stopped) thread;
 *   its registers are kept in state (a syscall it sat in made to restart, as compel does).
 * tracee_syscall(pid, state, nr, a1..a6) -> result: the thread runs one syscall of ours
 *   at a syscall instruction it already has (where it stopped); result is the syscall's
 *   return (a negative errno as the kernel gives it).
 * tracee_detach(pid, state): its registers back, SIGSTOP re-sent (it stays stopped), detached.
 * vm_write(pid, addr, data), vm_read(pid, addr, n) -> bytes: process_vm_writev/readv.
 * epoll_ctl_as(epfd, op, targets, ours, events, data): epoll_ctl(epfd, op, target, ...) as
 *   if the descriptor `ours[i]` were at number `targets[i]` (the epoll's key is the file and
 *   the number its owner used): from a thread with a private copy of our descriptor table
 *   (unshare CLONE_FILES), each `ours[i]` duplicated to `targets[i]` there. epfd must be
 *   above every target. events/data may be None (DEL). OSError names the index.
 */
#include "_repair.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

/* the kernel's restart codes (include/linux/errno.h: not for user space) */
#define ERESTARTSYS_ 512
#define ERESTARTNOINTR_ 513
#define ERESTARTNOHAND_ 514
#define ERESTART_RESTARTBLOCK_ 516

#if defined(__x86_64__)
struct tracee {
    struct user_regs_struct saved;
    unsigned long sysaddr;
};

static int wait_stop(int pid, int *status)
{
    for (;;) {
        if (waitpid(pid, status, __WALL) < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (!WIFSTOPPED(*status)) { errno = ESRCH; return -1; }
        return 0;
    }
}

static int is_syscall_insn(int pid, unsigned long addr)
{
    unsigned char b[2];
    struct iovec l = {b, 2}, r = {(void *)addr, 2};
    return process_vm_readv(pid, &l, 1, &r, 1, 0) == 2 && b[0] == 0x0f && b[1] == 0x05;
}

PyObject *py_tracee_attach(PyObject *self, PyObject *args)
{
    int pid, st, err = 0;
    const char *step = "PTRACE_SEIZE";
    struct tracee t;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &pid)) return NULL;
    memset(&t, 0, sizeof t);
    Py_BEGIN_ALLOW_THREADS
    if (ptrace(PTRACE_SEIZE, pid, 0, (void *)(long)PTRACE_O_TRACESYSGOOD) < 0) { err = errno; goto done; }
    step = "PTRACE_INTERRUPT";
    if (ptrace(PTRACE_INTERRUPT, pid, 0, 0) < 0 || wait_stop(pid, &st) < 0) { err = errno; goto detach; }
    step = "PTRACE_GETREGS";
    if (ptrace(PTRACE_GETREGS, pid, 0, &t.saved) < 0) { err = errno; goto detach; }
    if ((long)t.saved.orig_rax >= 0) {  /* stopped in a syscall: restart it when let go */
        long ax = (long)t.saved.rax;
        t.sysaddr = t.saved.rip - 2;
        if (ax == -ERESTARTSYS_ || ax == -ERESTARTNOINTR_ || ax == -ERESTARTNOHAND_) {
            t.saved.rax = t.saved.orig_rax;
            t.saved.rip -= 2;
        } else if (ax == -ERESTART_RESTARTBLOCK_) {
            t.saved.rax = (unsigned long)-EINTR;
        }
        t.saved.orig_rax = (unsigned long)-1;
    } else {
        t.sysaddr = t.saved.rip;  /* criu's restore leaves it at its (rewound) syscall */
    }
    step = "find a syscall instruction";
    if (!is_syscall_insn(pid, t.sysaddr)) {
        if (is_syscall_insn(pid, t.saved.rip - 2)) t.sysaddr = t.saved.rip - 2;
        else { err = ENOEXEC; goto detach; }
    }
    goto done;
detach:
    ptrace(PTRACE_DETACH, pid, 0, 0);
done:;
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, step);
    }
    return PyBytes_FromStringAndSize((const char *)&t, sizeof t);
}

static int get_state(PyObject *o, struct tracee *t)
{
    char *buf;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(o, &buf, &n) < 0) return -1;
    if (n != (Py_ssize_t)sizeof *t) { PyErr_SetString(PyExc_ValueError, "not a tracee state"); return -1; }
    memcpy(t, buf, sizeof *t);
    return 0;
}

PyObject *py_tracee_syscall(PyObject *self, PyObject *args)
{
    int pid, st, err = 0, k;
    PyObject *so;
    long nr, a[6] = {0, 0, 0, 0, 0, 0};
    struct tracee t;
    struct user_regs_struct r;
    const char *step = "PTRACE_SETREGS";
    (void)self;
    if (!PyArg_ParseTuple(args, "iOl|llllll", &pid, &so, &nr, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5]))
        return NULL;
    if (get_state(so, &t) < 0) return NULL;
    r = t.saved;
    r.rax = nr;
    r.orig_rax = (unsigned long)-1;
    r.rdi = a[0]; r.rsi = a[1]; r.rdx = a[2]; r.r10 = a[3]; r.r8 = a[4]; r.r9 = a[5];
    r.rip = t.sysaddr;
    Py_BEGIN_ALLOW_THREADS
    if (ptrace(PTRACE_SETREGS, pid, 0, &r) < 0) { err = errno; goto done; }
    step = "PTRACE_SYSCALL to the entry";
    for (k = 0;; k++) {  /* a stop signal met on the way is swallowed: detach sends SIGSTOP again */
        if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0 || wait_stop(pid, &st) < 0) { err = errno; goto done; }
        if (WSTOPSIG(st) == (SIGTRAP | 0x80)) break;
        if (k >= 8) { err = EPROTO; goto done; }
    }
    step = "PTRACE_SYSCALL to the exit";
    if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0 || wait_stop(pid, &st) < 0) { err = errno; goto done; }
    if (WSTOPSIG(st) != (SIGTRAP | 0x80)) { err = EPROTO; goto done; }
    step = "PTRACE_GETREGS";
    if (ptrace(PTRACE_GETREGS, pid, 0, &r) < 0) { err = errno; goto done; }
done:;
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, step);
    }
    return PyLong_FromLong((long)r.rax);
}

PyObject *py_tracee_detach(PyObject *self, PyObject *args)
{
    int pid, err = 0;
    PyObject *so;
    struct tracee t;
    (void)self;
    if (!PyArg_ParseTuple(args, "iO", &pid, &so)) return NULL;
    if (get_state(so, &t) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (ptrace(PTRACE_SETREGS, pid, 0, &t.saved) < 0) err = errno;
    kill(pid, SIGSTOP);  /* queued before we let go: it runs no instruction of its own */
    if (ptrace(PTRACE_DETACH, pid, 0, 0) < 0 && !err) err = errno;
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "detach");
    }
    Py_RETURN_NONE;
}

#else  /* the registers and the syscall instruction above are x86_64's */
static PyObject *no_ptrace(void)
{
    errno = ENOSYS;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "syscalls run in a program: x86_64 only");
}
PyObject *py_tracee_attach(PyObject *self, PyObject *args) { (void)self; (void)args; return no_ptrace(); }
PyObject *py_tracee_syscall(PyObject *self, PyObject *args) { (void)self; (void)args; return no_ptrace(); }
PyObject *py_tracee_detach(PyObject *self, PyObject *args) { (void)self; (void)args; return no_ptrace(); }
#endif

PyObject *py_vm_write(PyObject *self, PyObject *args)
{
    int pid;
    unsigned long addr;
    Py_buffer b;
    ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "iky*", &pid, &addr, &b)) return NULL;
    struct iovec l = {b.buf, (size_t)b.len}, r = {(void *)addr, (size_t)b.len};
    n = process_vm_writev(pid, &l, 1, &r, 1, 0);
    PyBuffer_Release(&b);
    if (n != (ssize_t)l.iov_len) {
        if (n >= 0) errno = EIO;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "process_vm_writev");
    }
    Py_RETURN_NONE;
}

PyObject *py_vm_read(PyObject *self, PyObject *args)
{
    int pid;
    unsigned long addr;
    Py_ssize_t len;
    PyObject *out;
    ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "ikn", &pid, &addr, &len)) return NULL;
    if (len < 0 || len > (1 << 20)) { PyErr_SetString(PyExc_ValueError, "vm_read: bad length"); return NULL; }
    if (!(out = PyBytes_FromStringAndSize(NULL, len))) return NULL;
    struct iovec l = {PyBytes_AS_STRING(out), (size_t)len}, r = {(void *)addr, (size_t)len};
    n = process_vm_readv(pid, &l, 1, &r, 1, 0);
    if (n != len) {
        Py_DECREF(out);
        if (n >= 0) errno = EIO;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "process_vm_readv");
    }
    return out;
}

struct eops {
    int epfd, op;
    Py_ssize_t n, at;
    int *targets, *ours;
    uint32_t *events;
    uint64_t *data;
    int err;
};

static void *eops_run(void *arg)
{
    struct eops *o = arg;
    Py_ssize_t i;
    int above = o->epfd;
    if (unshare(CLONE_FILES) < 0) { o->err = errno; o->at = -1; return NULL; }
    for (i = 0; i < o->n; i++)
        if (o->targets[i] > above) above = o->targets[i];
    /* ours first moved above every target: a dup2 to a target must not replace one of them */
    for (i = 0; i < o->n; i++) {
        int moved = fcntl(o->ours[i], F_DUPFD_CLOEXEC, above + 1);
        if (moved < 0) { o->err = errno; o->at = i; return NULL; }
        o->ours[i] = moved;
    }
    for (i = 0; i < o->n; i++) {
        struct epoll_event ev = {.events = o->events ? o->events[i] : 0, .data.u64 = o->data ? o->data[i] : 0};
        if (o->targets[i] >= o->epfd) { o->err = EBADF; o->at = i; return NULL; }
        if (dup2(o->ours[i], o->targets[i]) < 0 || epoll_ctl(o->epfd, o->op, o->targets[i], &ev) < 0) {
            o->err = errno;
            o->at = i;
            return NULL;
        }
    }
    return NULL;  /* the private table goes with the thread: nothing of it stays */
}

PyObject *py_epoll_ctl_as(PyObject *self, PyObject *args)
{
    int epfd, op, e;
    PyObject *ti, *oi, *evi, *di, *res = NULL;
    PyObject *seqs[4] = {NULL, NULL, NULL, NULL};
    struct eops o;
    pthread_t th;
    Py_ssize_t i;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiOOOO", &epfd, &op, &ti, &oi, &evi, &di)) return NULL;
    memset(&o, 0, sizeof o);
    o.epfd = epfd; o.op = op; o.at = -2;
    if (!(seqs[0] = PySequence_Fast(ti, "targets")) || !(seqs[1] = PySequence_Fast(oi, "ours"))) goto out;
    o.n = PySequence_Fast_GET_SIZE(seqs[0]);
    if (PySequence_Fast_GET_SIZE(seqs[1]) != o.n) { PyErr_SetString(PyExc_ValueError, "epoll_ctl_as: lengths"); goto out; }
    if (evi != Py_None) {
        if (!(seqs[2] = PySequence_Fast(evi, "events")) || !(seqs[3] = PySequence_Fast(di, "data"))) goto out;
        if (PySequence_Fast_GET_SIZE(seqs[2]) != o.n || PySequence_Fast_GET_SIZE(seqs[3]) != o.n) {
            PyErr_SetString(PyExc_ValueError, "epoll_ctl_as: lengths");
            goto out;
        }
    }
    o.targets = PyMem_New(int, o.n + 1);
    o.ours = PyMem_New(int, o.n + 1);
    if (seqs[2]) { o.events = PyMem_New(uint32_t, o.n + 1); o.data = PyMem_New(uint64_t, o.n + 1); }
    if (!o.targets || !o.ours || (seqs[2] && (!o.events || !o.data))) { PyErr_NoMemory(); goto out; }
    for (i = 0; i < o.n; i++) {
        long t = PyLong_AsLong(PySequence_Fast_GET_ITEM(seqs[0], i));
        long u = PyLong_AsLong(PySequence_Fast_GET_ITEM(seqs[1], i));
        if (PyErr_Occurred()) goto out;
        if (t < 0 || t > 0x7fffffff || u < 0 || u > 0x7fffffff) { PyErr_SetString(PyExc_ValueError, "epoll_ctl_as: bad fd"); goto out; }
        o.targets[i] = (int)t; o.ours[i] = (int)u;
        if (seqs[2]) {
            unsigned long ev = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seqs[2], i));
            unsigned long long d = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seqs[3], i));
            if (PyErr_Occurred()) goto out;
            o.events[i] = (uint32_t)ev; o.data[i] = d;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    e = pthread_create(&th, NULL, eops_run, &o);
    if (!e) pthread_join(th, NULL);
    Py_END_ALLOW_THREADS
    if (e) { errno = e; PyErr_SetFromErrnoWithFilename(PyExc_OSError, "pthread_create"); goto out; }
    if (o.err) {
        char what[64];
        snprintf(what, sizeof what, "epoll_ctl at index %zd", o.at);
        errno = o.err;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, what);
        goto out;
    }
    res = Py_NewRef(Py_None);
out:
    for (i = 0; i < 4; i++) Py_XDECREF(seqs[i]);
    PyMem_Free(o.targets); PyMem_Free(o.ours); PyMem_Free(o.events); PyMem_Free(o.data);
    return res;
}

