#!/usr/bin/env python3
"""gen_dgx.py: writes the hwloc 2 XML of a DGX-like node for the placement tests (tests/topo/).
2 packages x 2 NUMA nodes x 8 cores x 2 PUs (PU os index c and c+32 are the two threads of core
c, as Linux numbers them), 8 NVIDIA GPUs two per NUMA node behind PCIe switches, one NIC per
package, and an ASPEED BMC VGA on package 0 that must not be taken for a GPU.
Usage: gen_dgx.py > dgx-2s8g.xml (the committed file is this script's output)."""
NCORE, NPKG, NNUMA = 8, 2, 2          # cores per NUMA node, packages, NUMA nodes per package
TOTAL = NCORE * NPKG * NNUMA          # 32 cores, 64 PUs
gp = [0]


def gpi():
    gp[0] += 1
    return gp[0]


def mask(pus):
    v = 0
    for p in pus:
        v |= 1 << p
    s = "%x" % v
    s = s.rjust((len(s) + 7) // 8 * 8, "0")
    return ",".join("0x" + s[i:i + 8] for i in range(0, len(s), 8))


def nmask(nodes):
    return mask(nodes)


out = []
w = out.append
allpus = list(range(2 * TOTAL))
w('<?xml version="1.0" encoding="UTF-8"?>')
w('<!DOCTYPE topology SYSTEM "hwloc2.dtd">')
w('<topology version="2.0">')
cs = mask(allpus)
ns = nmask(range(NPKG * NNUMA))
w(f'<object type="Machine" os_index="0" cpuset="{cs}" complete_cpuset="{cs}" allowed_cpuset="{cs}" '
  f'nodeset="{ns}" complete_nodeset="{ns}" allowed_nodeset="{ns}" gp_index="{gpi()}">')
w('<info name="HostName" value="dgx-like"/>')
bus = 0x07
gpu = 0
for p in range(NPKG):
    cores = range(p * NNUMA * NCORE, (p + 1) * NNUMA * NCORE)
    pus = list(cores) + [c + TOTAL for c in cores]
    nodes = range(p * NNUMA, (p + 1) * NNUMA)
    w(f'<object type="Package" os_index="{p}" cpuset="{mask(pus)}" complete_cpuset="{mask(pus)}" '
      f'nodeset="{nmask(nodes)}" complete_nodeset="{nmask(nodes)}" gp_index="{gpi()}">')
    w('<info name="CPUModel" value="DGX-like test CPU"/>')
    for n in nodes:
        ncores = range(n * NCORE, (n + 1) * NCORE)
        npus = list(ncores) + [c + TOTAL for c in ncores]
        m = mask(npus)
        w(f'<object type="Group" cpuset="{m}" complete_cpuset="{m}" nodeset="{nmask([n])}" '
          f'complete_nodeset="{nmask([n])}" gp_index="{gpi()}" kind="1000" subkind="0">')
        w(f'<object type="NUMANode" os_index="{n}" cpuset="{m}" complete_cpuset="{m}" nodeset="{nmask([n])}" '
          f'complete_nodeset="{nmask([n])}" gp_index="{gpi()}" local_memory="{256 << 30}"/>')
        w(f'<object type="L3Cache" os_index="{n}" cpuset="{m}" complete_cpuset="{m}" nodeset="{nmask([n])}" '
          f'complete_nodeset="{nmask([n])}" gp_index="{gpi()}" cache_size="33554432" depth="3" '
          f'cache_linesize="64" cache_associativity="16" cache_type="0">')
        for c in ncores:
            cm = mask([c, c + TOTAL])
            w(f'<object type="Core" os_index="{c}" cpuset="{cm}" complete_cpuset="{cm}" nodeset="{nmask([n])}" '
              f'complete_nodeset="{nmask([n])}" gp_index="{gpi()}">')
            for t in (c, c + TOTAL):
                tm = mask([t])
                w(f'<object type="PU" os_index="{t}" cpuset="{tm}" complete_cpuset="{tm}" '
                  f'nodeset="{nmask([n])}" complete_nodeset="{nmask([n])}" gp_index="{gpi()}"/>')
            w('</object>')
        w('</object>')  # L3
        # I/O: a host bridge -> PCIe switch -> two GPUs (and, on the first node of a package, the NIC)
        w(f'<object type="Bridge" gp_index="{gpi()}" bridge_type="0-1" depth="0" '
          f'bridge_pci="0000:[{bus:02x}-{bus + 3:02x}]">')
        w(f'<object type="Bridge" gp_index="{gpi()}" bridge_type="1-1" depth="1" '
          f'pci_busid="0000:{bus:02x}:00.0" pci_type="0604 [10b5:c010] [10b5:c010] 00" '
          f'bridge_pci="0000:[{bus + 1:02x}-{bus + 3:02x}]">')
        for g in range(2):
            b = bus + 1 + g
            w(f'<object type="PCIDev" gp_index="{gpi()}" pci_busid="0000:{b:02x}:00.0" '
              f'pci_type="0302 [10de:2330] [10de:16c1] a1" pci_link_speed="31.507692"/>')
            gpu += 1
        if n % NNUMA == 0:
            w(f'<object type="PCIDev" gp_index="{gpi()}" pci_busid="0000:{bus + 3:02x}:00.0" '
              f'pci_type="0207 [15b3:1021] [15b3:0041] 00" pci_link_speed="31.507692"/>')
        w('</object></object>')
        if p == 0 and n == 0:  # the BMC's VGA: a display device that is not a GPU
            w(f'<object type="Bridge" gp_index="{gpi()}" bridge_type="0-1" depth="0" bridge_pci="0000:[05-05]">')
            w(f'<object type="PCIDev" gp_index="{gpi()}" pci_busid="0000:05:00.0" '
              f'pci_type="0300 [1a03:2000] [1a03:2000] 52" pci_link_speed="0.000000"/>')
            w('</object>')
        bus += 0x20
        w('</object>')  # Group
    w('</object>')  # Package
w('</object>')
w('</topology>')
print("\n".join(out))
