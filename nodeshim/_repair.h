/* nodeshim/_repair.h: what the two files of nodeshim._repair share: the kernel's
 * TCP_REPAIR constants, the packed record's layout (clustercore/sockwire.py) and the
 * functions of _repair_format.c (the record and the Python objects built from it). */
#ifndef VIPCLUSTER_REPAIR_H
#define VIPCLUSTER_REPAIR_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <linux/sockios.h>

#ifndef TCP_REPAIR
#define TCP_REPAIR 19
#endif
#ifndef TCP_REPAIR_QUEUE
#define TCP_REPAIR_QUEUE 20
#endif
#ifndef TCP_QUEUE_SEQ
#define TCP_QUEUE_SEQ 21
#endif
#ifndef TCP_REPAIR_OPTIONS
#define TCP_REPAIR_OPTIONS 22
#endif
#ifndef TCP_TIMESTAMP
#define TCP_TIMESTAMP 24
#endif
#ifndef TCP_REPAIR_WINDOW
#define TCP_REPAIR_WINDOW 29
#endif
#ifndef SIOCOUTQNSD
#define SIOCOUTQNSD 0x894B
#endif
#ifndef SO_SNDBUFFORCE
#define SO_SNDBUFFORCE 32
#endif
#ifndef SO_RCVBUFFORCE
#define SO_RCVBUFFORCE 33
#endif

#define REPAIR_ON 1
#define REPAIR_OFF 0
#define REPAIR_OFF_NO_WP (-1)
#define Q_RECV 1
#define Q_SEND 2
#define OPT_TS 1 /* TCPI_OPT_TIMESTAMPS */
#define OPT_SACK 2
#define OPT_WSCALE 4
#define F_WS 1 /* record flags, as sockwire */
#define F_TS 2
#define F_SACK 4
#define KIND_MSS 2
#define KIND_WINDOW 3
#define KIND_SACK_PERM 4
#define KIND_TIMESTAMP 8
#define STATE_ESTABLISHED 1
#define MIN_MSS 88
#define MAX_WSCALE 14
#define BUF_SLACK 32768
#define QUEUE_MAX 0x40000000u /* sockstate: a queue of 1 GiB or more is refused */
#define HEAD4 62
#define HEAD6 86
#define HEAD_MAX HEAD6

struct repair_window { /* struct tcp_repair_window */
    uint32_t snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup;
};

/* one connection, as in the record; the queues and the name point into the record */
struct conn {
    int family; /* 4 or 6 */
    uint8_t lip[16], rip[16];
    uint16_t lport, rport, mss;
    uint8_t sws, rws, flags;
    uint32_t tsval;
    struct repair_window w;
    uint32_t send_seq, recv_seq, rlen, slen, unsent;
    uint8_t nlen;
    const uint8_t *name, *rq, *sq;
};

/* the record: its head's size, packing a head, the field checks (NULL: fine, else what is
 * wrong), and the total parser of one whole record */
size_t head_size(int family);
void pack_head(const struct conn *c, uint8_t *out);
const char *check_conn(const struct conn *c);
int parse_record(const uint8_t *data, size_t len, int family, struct conn *c, const char **why);

/* TcpConnState / TcpWindow objects built from a connection (see _repair_format.c) */
struct builder {
    PyTypeObject *conn_t, *win_t;
    PyObject *ip_text, *ips; /* ips: {address bytes: text}, for this call */
    Py_ssize_t keep_max;
};
PyObject *make_state(struct builder *b, const struct conn *c, PyObject *rec);
/* unpack_many(data, family, types): a peer's packed records as TcpConnState objects */
PyObject *py_unpack_many(PyObject *self, PyObject *args);
int repair_format_init(void);

/* _repair_take.c */
PyObject *py_take_many(PyObject *self, PyObject *args);
PyObject *py_warm_fds(PyObject *self, PyObject *args);

/* _repair_opts.c */
PyObject *py_sockopts_many(PyObject *self, PyObject *args);
PyObject *py_set_sockopts_many(PyObject *self, PyObject *args);
PyObject *py_new_sockets(PyObject *self, PyObject *args);
int repair_opts_size(void);

/* _repair_inject.c */
PyObject *py_tracee_attach(PyObject *self, PyObject *args);
PyObject *py_tracee_syscall(PyObject *self, PyObject *args);
PyObject *py_tracee_detach(PyObject *self, PyObject *args);
PyObject *py_vm_write(PyObject *self, PyObject *args);
PyObject *py_vm_read(PyObject *self, PyObject *args);
PyObject *py_epoll_ctl_as(PyObject *self, PyObject *args);

#endif
