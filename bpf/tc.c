/* tc.c: inbound plaintext capture on the node's interfaces (TC, clsact).
 *
 * Why TC on the node side: every packet that can reach a pod from outside it
 * (other nodes on the fabric, other pods of this node through their veths)
 * crosses one of the node's interfaces, so NAT there needs nothing inside the
 * pod's netns (unlike sk_lookup) and no netfilter (unlike TPROXY, which would
 * also make the ztunnel depend on iptables rules the agent does not own). The
 * ztunnel's own connections to pods start in the node netns and never cross a
 * TC ingress hook, so they are not captured again.
 *
 *   ambit_tc_ingress  (ingress of fabric interfaces and pods' host-side veths)
 *       TCP from an enrolled pod's address to anything but the ztunnel is
 *       dropped and counted (the cgroup programs already stop it inside the
 *       pod; this catches a process that left the pod's cgroup but not its
 *       network namespace).
 *       A SYN to an enrolled pod: STRICT on that port -> drop and count;
 *       PERMISSIVE -> DNAT to the ztunnel's 15006 listener, remembering
 *       (client ip, client port) -> original destination in in_orig_dst (which
 *       also answers the ztunnel's SO_ORIGINAL_DST on 15006). The mode is the
 *       pod's, or its port's from ambit_port_modes (portLevelMtls). Later
 *       packets of that flow are DNATed by the same entry; anything else to the
 *       pod passes to the pod's cgroup_skb ingress program, which drops TCP not
 *       from the ztunnel. A DNATed frame that arrived on a bridge port is
 *       readdressed to the bridge's MAC (ambit_ifaces), so the bridge hands it
 *       to the node instead of forwarding it to the pod (same-node clients).
 *   ambit_tc_egress   (egress of the same interfaces)
 *       reverse NAT: from ztunnel:15006 to a recorded client -> from the
 *       original pod ip:port.
 * IPv4 with an Ethernet header only (veths and Ethernet fabrics).
 */
#include "ambit.h"

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

struct ambit_pkt {
    __u32 saddr, daddr;
    __u16 sport, dport; /* network order */
    __u8 flags;         /* TCP flags byte */
    __u32 l4_off;
};

static __always_inline int parse_tcp4(struct __sk_buff *skb, struct ambit_pkt *p)
{
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return 0;
    struct iphdr iph;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) < 0)
        return 0;
    if (iph.protocol != IPPROTO_TCP || (iph.frag_off & bpf_htons(0x1fff)))
        return 0;
    p->l4_off = ETH_HLEN + iph.ihl * 4;
    __u16 ports[2];
    if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
        return 0;
    if (bpf_skb_load_bytes(skb, p->l4_off + 13, &p->flags, 1) < 0)
        return 0;
    p->saddr = iph.saddr;
    p->daddr = iph.daddr;
    p->sport = ports[0];
    p->dport = ports[1];
    return 1;
}

/* Rewrite one address and port of the packet, fixing IP and TCP checksums. */
static __always_inline int rewrite(struct __sk_buff *skb, __u32 l4_off, int dst, __u32 old_ip, __u32 new_ip,
                                   __u16 old_port, __u16 new_port)
{
    __u32 csum_off = l4_off + offsetof(struct tcphdr, check);
    __u32 port_off = l4_off + (dst ? offsetof(struct tcphdr, dest) : offsetof(struct tcphdr, source));
    if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip, BPF_F_PSEUDO_HDR | sizeof(new_ip)) < 0)
        return -1;
    if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, sizeof(new_port)) < 0)
        return -1;
    if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, sizeof(new_ip)) < 0)
        return -1;
    if (bpf_skb_store_bytes(skb, dst ? IP_DST_OFF : IP_SRC_OFF, &new_ip, sizeof(new_ip), 0) < 0)
        return -1;
    if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
        return -1;
    return 0;
}

int ambit_tc_ingress(struct __sk_buff *skb)
{
    struct ambit_pkt p = {};
    if (!parse_tcp4(skb, &p))
        return TC_ACT_OK;
    struct ambit_pod_ip *src = ambit_pod_ips.lookup(&p.saddr);
    if (src && src->enrolled && !ambit_ztunnel.lookup(&p.daddr)) {
        ambit_count_drop(src->cgroup_id, AMBIT_EV_DROP_EGRESS, p.saddr, p.daddr, bpf_ntohs(p.sport),
                         bpf_ntohs(p.dport));
        return TC_ACT_SHOT;
    }
    struct ambit_pod_ip *pod = ambit_pod_ips.lookup(&p.daddr);
    if (!pod || !pod->enrolled)
        return TC_ACT_OK;
    if (ambit_ztunnel.lookup(&p.saddr))
        return TC_ACT_OK;
    u32 zero = 0;
    struct ambit_config *cfg = ambit_config.lookup(&zero);
    struct ambit_addr key = {};
    key.ip = p.saddr;
    key.port = p.sport;
    int syn = (p.flags & 0x02) && !(p.flags & 0x10);
    if (syn) {
        __u8 mode = pod->mode;
        struct ambit_port_key pk = {};
        pk.ip = p.daddr;
        pk.port = p.dport;
        __u8 *port_mode = ambit_port_modes.lookup(&pk);
        if (port_mode)
            mode = *port_mode;
        if (mode == AMBIT_MODE_STRICT || !cfg || !cfg->inbound_ip) {
            ambit_count_drop(pod->cgroup_id, AMBIT_EV_DROP_STRICT, p.saddr, p.daddr, bpf_ntohs(p.sport),
                             bpf_ntohs(p.dport));
            return TC_ACT_SHOT;
        }
        struct ambit_addr orig = {};
        orig.ip = p.daddr;
        orig.port = p.dport;
        ambit_in_dst.update(&key, &orig);
    } else {
        struct ambit_addr *orig = ambit_in_dst.lookup(&key);
        /* not a captured flow (e.g. replies to an excepted outbound port):
         * the pod's cgroup_skb ingress program decides */
        if (!orig || orig->ip != p.daddr || orig->port != p.dport || !cfg || !cfg->inbound_ip)
            return TC_ACT_OK;
    }
    if (rewrite(skb, p.l4_off, 1, p.daddr, cfg->inbound_ip, p.dport, cfg->inbound_port) < 0)
        return TC_ACT_SHOT;
    __u32 ifindex = skb->ifindex;
    struct ambit_iface *ifc = ambit_ifaces.lookup(&ifindex);
    if (ifc && bpf_skb_store_bytes(skb, 0, ifc->mac, sizeof(ifc->mac), 0) < 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

int ambit_tc_egress(struct __sk_buff *skb)
{
    struct ambit_pkt p = {};
    if (!parse_tcp4(skb, &p))
        return TC_ACT_OK;
    u32 zero = 0;
    struct ambit_config *cfg = ambit_config.lookup(&zero);
    if (!cfg || !cfg->inbound_ip || p.saddr != cfg->inbound_ip || p.sport != cfg->inbound_port)
        return TC_ACT_OK;
    struct ambit_addr key = {};
    key.ip = p.daddr;
    key.port = p.dport;
    struct ambit_addr *orig = ambit_in_dst.lookup(&key);
    if (!orig)
        return TC_ACT_OK;
    __u32 new_ip = orig->ip;
    __u16 new_port = orig->port;
    if (rewrite(skb, p.l4_off, 0, p.saddr, new_ip, p.sport, new_port) < 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}
