/* cgroup.c: the programs attached to cgroups.
 *
 * On each enrolled pod's cgroup:
 *   ambit_connect4/6   cgroup/connect4, connect6: rewrite TCP connects to the
 *                      node's ztunnel outbound listener, remembering the
 *                      original destination by socket cookie.
 *   ambit_sockops      sock_ops: on ACTIVE_ESTABLISHED move that original
 *                      destination to (client ip, client port) in out_orig_dst
 *                      (removed again on close); report flow open/close
 *                      (bytes, srtt) on the ring buffer.
 *   ambit_egress/ingress  cgroup_skb: TCP of an enrolled pod may only talk to
 *                      the ztunnel's addresses, loopback and excepted ports;
 *                      anything else (raw sockets, connections opened before
 *                      enrollment) is dropped and counted.
 * On the ztunnel's cgroup (or an ancestor of it):
 *   ambit_getsockopt   cgroup/getsockopt: answers getsockopt(SOL_IP,
 *                      SO_ORIGINAL_DST) on the ztunnel's 15001 sockets from
 *                      out_orig_dst and on its 15006 sockets from in_orig_dst.
 *
 * Programs attached to a cgroup also run for every cgroup below it, present
 * and future, so each finds its pod by walking the caller's ancestors from the
 * top (a container's cgroup, or one a process made under its pod, belongs to
 * that pod). Every program that steers or drops traffic (connect4/6,
 * egress/ingress) then checks the pod's `enrolled` flag, so an attached but
 * unenrolled pod sees no effect, and enrollment can change on a running pod by
 * a map update alone. sock_ops only observes: it reports every flow of its cgroup.
 */
#include "ambit.h"

/* The enrolled pod of the calling task: its nearest ancestor cgroup (or its own)
 * listed in ambit_pods. Walks from the top, so the depth of cgroups a process
 * creates below its pod does not matter; pods never nest. */
static __always_inline struct ambit_pod *current_pod(void)
{
#pragma unroll
    for (int level = 1; level <= AMBIT_MAX_CGROUP_DEPTH; level++) {
        u64 id = bpf_get_current_ancestor_cgroup_id(level);
        if (!id)
            return 0;
        struct ambit_pod *pod = ambit_pods.lookup(&id);
        if (pod)
            return pod->enrolled ? pod : 0;
    }
    return 0;
}

/* The same for the socket that owns a packet (cgroup_skb). */
static __always_inline struct ambit_pod *skb_pod(struct __sk_buff *skb)
{
#pragma unroll
    for (int level = 1; level <= AMBIT_MAX_CGROUP_DEPTH; level++) {
        u64 id = bpf_skb_ancestor_cgroup_id(skb, level);
        if (!id)
            return 0;
        struct ambit_pod *pod = ambit_pods.lookup(&id);
        if (pod)
            return pod->enrolled ? pod : 0;
    }
    return 0;
}

/* Returns 1 to let the connect proceed (possibly rewritten), 0 to refuse it (EPERM). */
static __always_inline int redirect4(struct bpf_sock_addr *ctx, struct ambit_pod *pod, __u32 dip, __u16 dport_be,
                                     int mapped)
{
    u32 zero = 0;
    struct ambit_config *cfg = ambit_config.lookup(&zero);
    /* Fail closed: an enrolled pod with no configured ztunnel gets no plaintext. */
    if (!cfg || !cfg->outbound_ip)
        return 0;
    if (dip == cfg->outbound_ip && dport_be == cfg->outbound_port)
        return 1; /* already pointed at the ztunnel (e.g. by an overlapping program during an agent restart) */
    if (ambit_port_excepted(pod, bpf_ntohs(dport_be)))
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct ambit_addr orig = {};
    orig.ip = dip;
    orig.port = dport_be;
    ambit_cookie_dst.update(&cookie, &orig);
    if (mapped)
        ctx->user_ip6[3] = cfg->outbound_ip;
    else
        ctx->user_ip4 = cfg->outbound_ip;
    ctx->user_port = cfg->outbound_port;
    return 1;
}

int ambit_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != AMBIT_SOCK_STREAM)
        return 1;
    struct ambit_pod *pod = current_pod();
    if (!pod)
        return 1;
    __u32 dip = ctx->user_ip4;
    if (ambit_is_local4(dip))
        return 1;
    return redirect4(ctx, pod, dip, (__u16)ctx->user_port, 0);
}

int ambit_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != AMBIT_SOCK_STREAM)
        return 1;
    struct ambit_pod *pod = current_pod();
    if (!pod)
        return 1;
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
    if (a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1))
        return 1; /* ::1 */
    if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
        if (ambit_is_local4(a3))
            return 1;
        return redirect4(ctx, pod, a3, (__u16)ctx->user_port, 1);
    }
    /* The mesh is IPv4: native IPv6 TCP of an enrolled pod would bypass the
     * ztunnel, so refuse it rather than let it out in plaintext. */
    return 0;
}

/* Pin a value read from the context in a register right where it is read, so
 * clang cannot merge reads from two branches into arithmetic on the ctx
 * pointer (which the verifier rejects). */
#define AMBIT_CTX_READ(dst, expr) do { dst = (expr); asm volatile("" : "+r"(dst)); } while (0)

static __always_inline int sockops_ipv4(struct bpf_sock_ops *skops, __u32 *lip, __u32 *rip)
{
    __u32 family, l4, r4, l6_0, l6_1, l6_2, l6_3, r6_3;
    AMBIT_CTX_READ(family, skops->family);
    AMBIT_CTX_READ(l4, skops->local_ip4);
    AMBIT_CTX_READ(r4, skops->remote_ip4);
    AMBIT_CTX_READ(l6_0, skops->local_ip6[0]);
    AMBIT_CTX_READ(l6_1, skops->local_ip6[1]);
    AMBIT_CTX_READ(l6_2, skops->local_ip6[2]);
    AMBIT_CTX_READ(l6_3, skops->local_ip6[3]);
    AMBIT_CTX_READ(r6_3, skops->remote_ip6[3]);
    if (family == AF_INET) {
        *lip = l4;
        *rip = r4;
        return 1;
    }
    if (family == AF_INET6 && l6_0 == 0 && l6_1 == 0 && l6_2 == bpf_htonl(0xffff)) {
        *lip = l6_3;
        *rip = r6_3;
        return 1;
    }
    return 0;
}

int ambit_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
        op != BPF_SOCK_OPS_STATE_CB)
        return 1;
    __u32 lip = 0, rip = 0;
    if (!sockops_ipv4(skops, &lip, &rip))
        return 1;
    struct ambit_event ev = {};
    ev.ts_ns = bpf_ktime_get_ns();
    ev.cookie = bpf_get_socket_cookie(skops);
    ev.saddr = lip;
    ev.daddr = rip;
    ev.sport = (__u16)skops->local_port;
    /* the kernel presents remote_port as the network-order port shifted into the upper half */
    ev.dport = bpf_ntohs((__u16)(skops->remote_port >> 16));
    ev.srtt_us = skops->srtt_us >> 3;
    ev.bytes_acked = skops->bytes_acked;
    ev.bytes_received = skops->bytes_received;
    /* sock_ops may not call bpf_sk_cgroup_id and runs in softirq for most ops,
     * so cgroup_id stays 0 here: the agent attributes the flow by the pod IP. */

    if (op == BPF_SOCK_OPS_STATE_CB) {
        if (skops->args[1] != BPF_TCP_CLOSE)
            return 1;
        /* the ztunnel read it right after accept; keep no stale answer for this address */
        struct ambit_addr done = {};
        done.ip = lip;
        done.port = bpf_htons(ev.sport);
        ambit_out_dst.delete(&done);
        ev.kind = AMBIT_EV_CLOSE;
        ambit_events.ringbuf_output(&ev, sizeof(ev), 0);
        return 1;
    }
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        ev.kind = AMBIT_EV_OPEN_ACTIVE;
        struct ambit_addr *orig = ambit_cookie_dst.lookup(&ev.cookie);
        if (orig) {
            struct ambit_addr key = {};
            key.ip = lip;
            key.port = bpf_htons(ev.sport);
            struct ambit_addr val = *orig;
            ambit_out_dst.update(&key, &val);
            ambit_cookie_dst.delete(&ev.cookie);
            ev.orig_daddr = val.ip;
            ev.orig_dport = bpf_ntohs(val.port);
        }
    } else {
        ev.kind = AMBIT_EV_OPEN_PASSIVE;
    }
    ambit_events.ringbuf_output(&ev, sizeof(ev), 0);
    return 1;
}

int ambit_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != SOL_IP || ctx->optname != AMBIT_SO_ORIGINAL_DST)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    u32 zero = 0;
    struct ambit_config *cfg = ambit_config.lookup(&zero);
    if (!cfg)
        return 1;
    /* which listener accepted this socket decides which map may answer */
    __u32 lip = sk->src_ip4;
    __u16 lport = (__u16)sk->src_port; /* host order */
    struct ambit_addr key = {};
    key.ip = sk->dst_ip4;
    key.port = (__u16)sk->dst_port;
    struct ambit_addr *orig = 0;
    if (lip == cfg->outbound_ip && lport == bpf_ntohs(cfg->outbound_port))
        orig = ambit_out_dst.lookup(&key);
    else if (lip == cfg->inbound_ip && lport == bpf_ntohs(cfg->inbound_port))
        orig = ambit_in_dst.lookup(&key);
    if (!orig)
        return 1; /* not ours: keep the kernel's own answer (e.g. from iptables), or its ENOENT */
    struct sockaddr_in *sin = ctx->optval;
    if ((void *)(sin + 1) > ctx->optval_end)
        return 1;
    sin->sin_family = AF_INET;
    sin->sin_port = orig->port;
    sin->sin_addr.s_addr = orig->ip;
    ctx->optlen = sizeof(*sin);
    /* keep the two 4-byte context stores apart: merged into one 8-byte store the verifier rejects them */
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    return 1;
}

/* Read IPv4/IPv6 + TCP ports of a cgroup_skb packet. Returns 1 if it is TCP
 * that must be checked, 0 if it passes untouched (UDP, ICMP, ...). */
static __always_inline int skb_tcp(struct __sk_buff *skb, __u32 *saddr, __u32 *daddr, __u16 *sport,
                                   __u16 *dport, int *loopback, int *v6)
{
    *v6 = 0;
    *loopback = 0;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr iph;
        if (bpf_skb_load_bytes(skb, 0, &iph, sizeof(iph)) < 0)
            return 0;
        if (iph.protocol != IPPROTO_TCP)
            return 0;
        __u16 ports[2];
        if (bpf_skb_load_bytes(skb, iph.ihl * 4, ports, sizeof(ports)) < 0)
            return 0;
        *saddr = iph.saddr;
        *daddr = iph.daddr;
        *sport = bpf_ntohs(ports[0]);
        *dport = bpf_ntohs(ports[1]);
        *loopback = ambit_is_loopback4(iph.saddr) || ambit_is_loopback4(iph.daddr);
        return 1;
    }
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        __u8 nexthdr;
        if (bpf_skb_load_bytes(skb, 6, &nexthdr, 1) < 0 || nexthdr != IPPROTO_TCP)
            return 0;
        __u32 a[8];
        if (bpf_skb_load_bytes(skb, 8, a, sizeof(a)) < 0)
            return 0;
        __u16 ports[2];
        if (bpf_skb_load_bytes(skb, 40, ports, sizeof(ports)) < 0)
            return 0;
        *v6 = 1;
        *saddr = 0;
        *daddr = 0;
        *sport = bpf_ntohs(ports[0]);
        *dport = bpf_ntohs(ports[1]);
        *loopback = a[4] == 0 && a[5] == 0 && a[6] == 0 && a[7] == bpf_htonl(1);
        return 1;
    }
    return 0;
}

static __always_inline int skb_check(struct __sk_buff *skb, int egress)
{
    struct ambit_pod *pod = skb_pod(skb);
    if (!pod)
        return 1;
    __u32 saddr, daddr;
    __u16 sport, dport;
    int loopback, v6;
    if (!skb_tcp(skb, &saddr, &daddr, &sport, &dport, &loopback, &v6))
        return 1;
    if (loopback)
        return 1;
    if (!v6) {
        __u32 peer = egress ? daddr : saddr;
        if (ambit_ztunnel.lookup(&peer))
            return 1;
        /* traffic of a connection to an excepted port: its remote port is the excepted one */
        if (ambit_port_excepted(pod, egress ? dport : sport))
            return 1;
    }
    ambit_count_drop(pod->cgroup_id, egress ? AMBIT_EV_DROP_EGRESS : AMBIT_EV_DROP_INGRESS,
                     saddr, daddr, sport, dport);
    return 0;
}

int ambit_egress(struct __sk_buff *skb)
{
    return skb_check(skb, 1);
}

int ambit_ingress(struct __sk_buff *skb)
{
    return skb_check(skb, 0);
}
