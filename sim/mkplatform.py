#!/usr/bin/env python3
"""mkplatform.py: SimGrid platform XML for clusters of GPU nodes (docs/scaling.md).

Two shapes of node, both 8 GPUs on NVLink behind a non-blocking NVSwitch:

* `h100`, `a100` -- ONE UPLINK PER NODE. Each node is a SimGrid <cluster> of G GPUs: a private
  split-duplex link per GPU (NVLink-class, per direction) into the node's switch. The NVSwitch is
  non-blocking (G links' worth of bisection), so the cluster has no backbone link: one would never
  bind, and a shared constraint would tie every flow of the node into one max-min system that
  SimGrid re-solves at each event (with the uplinks, all flows of the platform: cubic host time in
  the rank count). Nodes hang off one non-blocking InfiniBand core (a full-bisection fat tree)
  through a split-duplex uplink at ONE GPU NIC's rate, shared by the flows that leave (enter) the
  node. That is exact for a ring (one GPU per node sends across) and for decode's latency-bound
  reductions; it understates traffic where several GPUs of a node cross at once, which is what
  `h100rail` is for.

* `h100rail` -- ONE NIC PER GPU, rail-optimized, as DGX / HGX H100 nodes are built and cabled:
  eight ConnectX-7 400 Gb/s adapters per node, one beside each GPU (DGX H100 User Guide, "Network
  Modules": each OSFP port's ConnectX-7 is listed with its GPU), the NIC of GPU i of every node on
  the leaf switch of rail i, the leaves joined by a spine into a non-blocking fat tree (DGX
  SuperPOD reference architecture). Each node is a zone with Full routing: GPU i to GPU j inside
  the node over their NVLink links (450 GB/s per direction: NVLink4, 18 links x 25 GB/s, "900 GB/s"
  bidirectional), GPU i to any other node over ITS OWN NIC link (50 GB/s per direction: 400 Gb/s
  NDR), into the core, and down the destination GPU's own NIC. So eight GPUs of a node cross at
  once at eight times one NIC's rate, and nothing is shared between the GPUs of a node but what
  the hardware shares (nothing, with a non-blocking fabric). What is not modelled: the rail
  leaves and the spine as separate hops. In a non-blocking two-tier fat tree they are never the
  bottleneck, only latency: a rail-aligned message (GPU i to GPU i of another node) turns at its
  leaf, a cross-rail one climbs to the spine (or NCCL's PXN first moves it over NVLink to the
  rail-aligned GPU). Every crossing here pays the same 7 us as `h100` (GPU side and PCIe 1 us +
  NIC 2 us + half the core 0.5 us, at each end), so the two platforms differ only in bandwidth.

  mkplatform.py h100 NODES > plat.xml      H100 SXM nodes: NVLink4 450 GB/s, NDR 50 GB/s per NODE
  mkplatform.py h100rail NODES > plat.xml  H100 SXM nodes: NVLink4 450 GB/s, NDR 50 GB/s per GPU
  mkplatform.py a100 NODES > plat.xml      A100 SXM nodes: NVLink3 300 GB/s, HDR 25 GB/s per node
  mkplatform.py KIND NODES --hostfile F    also writes the hostfile (one GPU per line, rank order)

Rates: NVLink4 900 GB/s bidirectional per H100 SXM GPU (NVIDIA H100 datasheet), i.e. 450 GB/s
per direction; ConnectX-7 / NDR InfiniBand 400 Gb/s = 50 GB/s per direction (NCCL reaches 46-49,
shared/anchors.md); A100: NVLink3 600 GB/s bidirectional, HDR 200 Gb/s. Latencies: about 1 us per
NVLink hop and 2 us per NIC (host-to-host NDR latency is quoted at about 1-2 us), 1 us core.
"""
import sys

KINDS = {
    # gpus per node, NVLink GB/s per direction and latency, NIC GB/s and latency, switch latency
    "h100": dict(gpus=8, nvl_gbps=450, nvl_us=1.0, nic_gbps=50, nic_us=2.0, core_us=1.0),
    "a100": dict(gpus=8, nvl_gbps=300, nvl_us=1.5, nic_gbps=25, nic_us=2.5, core_us=1.0),
    # One NIC per GPU; pcie_us: the GPU-to-NIC side of a crossing (PCIe switch), standing in for the
    # NVLink hop that the one-uplink platform charges there, so a crossing costs 7 us on both.
    "h100rail": dict(gpus=8, nvl_gbps=450, nvl_us=1.0, nic_gbps=50, nic_us=2.0, core_us=1.0, pcie_us=1.0,
                     rail=True),
}


def rail_node(kind, n, k):
    """One node of the rail-optimized platform: a Full-routing zone of G GPUs, their NVLink links
    (GPU to GPU) and their NIC links (GPU to the node's gateway, which every route off the node
    passes; the core is latency only, non-blocking)."""
    g = k["gpus"]
    gw = f"n{n}-gw"
    nic_lat = k["pcie_us"] + k["nic_us"] + k["core_us"] / 2
    out = [f'  <zone id="n{n}" routing="Full">']
    for i in range(g):
        out.append(f'    <host id="{kind}-{n}-{i}" speed="1Gf"/>')
    out.append(f'    <router id="{gw}"/>')
    for i in range(g):
        out.append(f'    <link id="n{n}-nvl{i}" bandwidth="{k["nvl_gbps"]}GBps" latency="{k["nvl_us"]}us" '
                   'sharing_policy="SPLITDUPLEX"/>')
        out.append(f'    <link id="n{n}-nic{i}" bandwidth="{k["nic_gbps"]}GBps" latency="{nic_lat}us" '
                   'sharing_policy="SPLITDUPLEX"/>')
    for i in range(g):
        for j in range(g):
            if i != j:
                out.append(f'    <route src="{kind}-{n}-{i}" dst="{kind}-{n}-{j}" symmetrical="NO">'
                           f'<link_ctn id="n{n}-nvl{i}" direction="UP"/><link_ctn id="n{n}-nvl{j}" direction="DOWN"/>'
                           '</route>')
        out.append(f'    <route src="{kind}-{n}-{i}" dst="{gw}" symmetrical="NO">'
                   f'<link_ctn id="n{n}-nic{i}" direction="UP"/></route>')
        out.append(f'    <route src="{gw}" dst="{kind}-{n}-{i}" symmetrical="NO">'
                   f'<link_ctn id="n{n}-nic{i}" direction="DOWN"/></route>')
    out.append('  </zone>')
    return out


def platform(kind, nodes):
    k = KINDS[kind]
    g = k["gpus"]
    out = ['<?xml version="1.0"?>',
           '<!DOCTYPE platform SYSTEM "https://simgrid.org/simgrid.dtd">',
           f'<!-- {nodes} {kind.upper()} nodes x {g} GPUs, generated by sim/mkplatform.py -->',
           '<platform version="4.1">',
           '<zone id="world" routing="Floyd">']
    for n in range(nodes):
        if k.get("rail"):
            out += rail_node(kind, n, k)
            continue
        out.append(f'  <cluster id="n{n}" prefix="{kind}-{n}-" suffix="" radical="0-{g - 1}" speed="1Gf" '
                   f'bw="{k["nvl_gbps"]}GBps" lat="{k["nvl_us"]}us" sharing_policy="SPLITDUPLEX" '
                   f'router_id="n{n}-sw"/>')
    if nodes > 1:
        # The IB core is a zone holding one router; each node's uplink carries half the core
        # latency, so a crossing pays both uplinks.
        out.append('  <zone id="ib" routing="Full"><router id="ib-core"/></zone>')
        if k.get("rail"):
            # The NICs are in the nodes' zones (the core's latency too). SimGrid forbids an empty
            # zone route: each node's rails join the core through a FATPIPE link of the node's eight
            # NICs' rate and no latency (a flow is held to its own bandwidth, never shared: it never
            # binds, a 50 GB/s NIC being in every such route).
            for n in range(nodes):
                out.append(f'  <link id="rails{n}" bandwidth="{k["gpus"] * k["nic_gbps"]}GBps" latency="0us" '
                           'sharing_policy="FATPIPE"/>')
            for n in range(nodes):
                out.append(f'  <zoneRoute src="n{n}" dst="ib" gw_src="n{n}-gw" gw_dst="ib-core" symmetrical="YES">'
                           f'<link_ctn id="rails{n}"/></zoneRoute>')
            out += ['</zone>', '</platform>']
            hosts = [f"{kind}-{n}-{i}" for n in range(nodes) for i in range(k["gpus"])]
            return "\n".join(out) + "\n", hosts
        lat = k["nic_us"] + k["core_us"] / 2
        for n in range(nodes):
            out.append(f'  <link id="up{n}" bandwidth="{k["nic_gbps"]}GBps" latency="{lat}us" '
                       'sharing_policy="SPLITDUPLEX"/>')
        for n in range(nodes):
            out.append(f'  <zoneRoute src="n{n}" dst="ib" gw_src="n{n}-sw" gw_dst="ib-core" symmetrical="YES">'
                       f'<link_ctn id="up{n}" direction="UP"/></zoneRoute>')
    out += ['</zone>', '</platform>']
    hosts = [f"{kind}-{n}-{i}" for n in range(nodes) for i in range(g)]
    return "\n".join(out) + "\n", hosts


def main(argv):
    if len(argv) < 3 or argv[1] not in KINDS:
        sys.exit(__doc__)
    xml, hosts = platform(argv[1], int(argv[2]))
    sys.stdout.write(xml)
    if "--hostfile" in argv:
        with open(argv[argv.index("--hostfile") + 1], "w") as f:
            f.write("\n".join(hosts) + "\n")


if __name__ == "__main__":
    main(sys.argv)
