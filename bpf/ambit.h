/* ambit.h: the data shared by every ambit eBPF program and the agent.
 *
 * Owns the layout of every map value and event (agent/bpf.py mirrors these
 * structs with ctypes; change both together) and the map declarations. All
 * maps are pinned under AMBIT_PIN (set by the loader with -DAMBIT_PIN="dir"),
 * so programs compiled separately (cgroup.c, tc.c) and a restarted agent all
 * share one set of maps. Addresses and ports in maps are in network byte
 * order unless the field says otherwise.
 */
#ifndef AMBIT_H
#define AMBIT_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#ifndef AMBIT_PIN
#error "AMBIT_PIN must be defined by the loader (-DAMBIT_PIN=\"/sys/fs/bpf/...\")"
#endif

#define AMBIT_MAX_PORTS 8
/* Deepest cgroup level (from the cgroup2 root, which is level 0) at which a pod's
 * own cgroup may sit; the programs find a process's pod by walking its ancestors
 * from the top, so sub-cgroups below the pod, however deep, are always covered. */
#define AMBIT_MAX_CGROUP_DEPTH 16
#define AMBIT_MODE_PERMISSIVE 0
#define AMBIT_MODE_STRICT 1
#define AMBIT_SO_ORIGINAL_DST 80
#define AMBIT_SOCK_STREAM 1 /* SOCK_STREAM; no libc socket.h in uapi-only builds */
/* Drop events are rate limited per pod: at most one per this many ns. */
#define AMBIT_DROP_EVENT_GAP_NS 10000000ULL

/* The node's ztunnel listeners, filled by the agent (one entry, key 0). */
struct ambit_config {
    __u32 outbound_ip;    /* 15001 listener */
    __u16 outbound_port;
    __u16 inbound_port;   /* 15006 plaintext listener */
    __u32 inbound_ip;
    __u32 flags;
};

/* Per-pod settings, keyed by the cgroup id of the pod's own cgroup. Processes in
 * sub-cgroups (containers, or cgroups a process made itself) belong to the pod
 * whose cgroup is their nearest listed ancestor (see ambit_pod_of_current). */
struct ambit_pod {
    __u8 enrolled;
    __u8 mode;            /* AMBIT_MODE_* for inbound plaintext */
    __u8 nports;
    __u8 _pad;
    __u16 ports[AMBIT_MAX_PORTS]; /* outbound port exceptions, host order */
    __u64 cgroup_id;      /* the pod's own cgroup: where its counters live */
};

/* Per-pod settings for TC, keyed by pod IPv4 address. `mode` is the pod's
 * inbound plaintext mode; ambit_port_modes overrides it per port. */
struct ambit_pod_ip {
    __u64 cgroup_id;
    __u8 enrolled;
    __u8 mode;
    __u16 _pad;
    __u32 _pad2;
};

/* (pod ip, port) for PeerAuthentication portLevelMtls exceptions. */
struct ambit_port_key {
    __u32 ip;
    __u16 port;           /* network order */
    __u16 _pad;
};

/* A node interface whose packets TC may DNAT to the ztunnel: when the
 * interface is a bridge port, the DNATed frame must be addressed to the
 * bridge itself (the node), or the bridge would forward it to the pod whose
 * MAC it still carries. */
struct ambit_iface {
    __u8 mac[6];
    __u16 _pad;
};

struct ambit_addr {
    __u32 ip;
    __u16 port;
    __u16 _pad;
};

struct ambit_drops {
    __u64 egress;          /* TCP leaving an enrolled pod not towards the ztunnel */
    __u64 ingress;         /* TCP reaching an enrolled pod not from the ztunnel */
    __u64 inbound_strict;  /* plaintext SYNs to a STRICT pod dropped on the node */
};

enum ambit_event_kind {
    AMBIT_EV_OPEN_ACTIVE = 1,
    AMBIT_EV_OPEN_PASSIVE = 2,
    AMBIT_EV_CLOSE = 3,
    AMBIT_EV_DROP_EGRESS = 4,
    AMBIT_EV_DROP_INGRESS = 5,
    AMBIT_EV_DROP_STRICT = 6,
    AMBIT_EV_INBOUND_REDIRECT = 7,
};

struct ambit_event {
    __u64 ts_ns;
    __u64 cookie;
    __u64 cgroup_id;
    __u64 bytes_acked;
    __u64 bytes_received;
    __u32 srtt_us;
    __u32 saddr;
    __u32 daddr;
    __u32 orig_daddr;     /* original destination of a redirected connect, else 0 */
    __u16 sport;          /* host order */
    __u16 dport;          /* host order */
    __u16 orig_dport;     /* host order */
    __u8 kind;
    __u8 _pad;
};

#define AMBIT_RINGBUF_PINNED(_name, _num_pages, _pinned) \
struct _name##_table_t { \
  int key; \
  u32 leaf; \
  int (*ringbuf_output) (void *, u64, u64); \
  void* (*ringbuf_reserve) (u64); \
  void (*ringbuf_discard) (void *, u64); \
  void (*ringbuf_submit) (void *, u64); \
  u32 max_entries; \
}; \
__attribute__((section("maps/ringbuf:" _pinned))) \
struct _name##_table_t _name = { .max_entries = ((_num_pages) * PAGE_SIZE) }

BPF_TABLE_PINNED("array", u32, struct ambit_config, ambit_config, 1, AMBIT_PIN "/config");
BPF_TABLE_PINNED("hash", u64, struct ambit_pod, ambit_pods, 16384, AMBIT_PIN "/pods");
BPF_TABLE_PINNED("hash", u32, struct ambit_pod_ip, ambit_pod_ips, 16384, AMBIT_PIN "/pod_ips");
BPF_TABLE_PINNED("hash", struct ambit_port_key, u8, ambit_port_modes, 65536, AMBIT_PIN "/port_modes");
BPF_TABLE_PINNED("hash", u32, u8, ambit_ztunnel, 64, AMBIT_PIN "/ztunnel_addrs");
BPF_TABLE_PINNED("hash", u32, struct ambit_iface, ambit_ifaces, 4096, AMBIT_PIN "/ifaces");
/* socket cookie -> original destination, between connect() and ESTABLISHED */
BPF_TABLE_PINNED("lru_hash", u64, struct ambit_addr, ambit_cookie_dst, 65536, AMBIT_PIN "/cookie_dst");
/* Original destinations by (client ip, client port), two maps that never mix:
 *   out_orig_dst  written only by sock_ops for a socket the connect hook
 *                 redirected; answers SO_ORIGINAL_DST on the 15001 listener only,
 *                 so nothing but an enrolled pod's own connect can name where
 *                 the ztunnel dials with that pod's identity;
 *   in_orig_dst   written by TC for plaintext DNATed to 15006; answers
 *                 SO_ORIGINAL_DST on the 15006 listener and drives the reverse NAT. */
BPF_TABLE_PINNED("lru_hash", struct ambit_addr, struct ambit_addr, ambit_out_dst, 65536, AMBIT_PIN "/out_orig_dst");
BPF_TABLE_PINNED("lru_hash", struct ambit_addr, struct ambit_addr, ambit_in_dst, 65536, AMBIT_PIN "/in_orig_dst");
BPF_TABLE_PINNED("hash", u64, struct ambit_drops, ambit_drops, 16384, AMBIT_PIN "/drops");
BPF_TABLE_PINNED("lru_hash", u64, u64, ambit_drop_rl, 16384, AMBIT_PIN "/drop_rl");
AMBIT_RINGBUF_PINNED(ambit_events, 64, AMBIT_PIN "/events");

static __always_inline int ambit_is_loopback4(__u32 ip_be)
{
    return (bpf_ntohl(ip_be) >> 24) == 127;
}

/* 127.0.0.0/8 and 0.0.0.0/8: a connect to either stays inside the caller's own
 * network namespace (the kernel sends 0.0.0.0 to the local host), so it is
 * never redirected; redirected, the ztunnel would dial it in the node's netns. */
static __always_inline int ambit_is_local4(__u32 ip_be)
{
    __u32 first = bpf_ntohl(ip_be) >> 24;
    return first == 127 || first == 0;
}

static __always_inline int ambit_port_excepted(const struct ambit_pod *pod, __u16 port_host)
{
#pragma unroll
    for (int i = 0; i < AMBIT_MAX_PORTS; i++) {
        if (i < pod->nports && pod->ports[i] == port_host)
            return 1;
    }
    return 0;
}

/* Count a drop against the pod and emit a rate-limited event. */
static __always_inline void ambit_count_drop(__u64 cgroup_id, __u8 kind, __u32 saddr, __u32 daddr,
                                             __u16 sport, __u16 dport)
{
    struct ambit_drops zero = {};
    struct ambit_drops *d = ambit_drops.lookup_or_try_init(&cgroup_id, &zero);
    if (d) {
        if (kind == AMBIT_EV_DROP_EGRESS)
            __sync_fetch_and_add(&d->egress, 1);
        else if (kind == AMBIT_EV_DROP_INGRESS)
            __sync_fetch_and_add(&d->ingress, 1);
        else
            __sync_fetch_and_add(&d->inbound_strict, 1);
    }
    __u64 now = bpf_ktime_get_ns();
    __u64 *last = ambit_drop_rl.lookup(&cgroup_id);
    if (last && now - *last < AMBIT_DROP_EVENT_GAP_NS)
        return;
    ambit_drop_rl.update(&cgroup_id, &now);
    struct ambit_event ev = {};
    ev.ts_ns = now;
    ev.cgroup_id = cgroup_id;
    ev.kind = kind;
    ev.saddr = saddr;
    ev.daddr = daddr;
    ev.sport = sport;
    ev.dport = dport;
    ambit_events.ringbuf_output(&ev, sizeof(ev), 0);
}

#endif
