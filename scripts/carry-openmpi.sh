#!/usr/bin/env bash
# carry-openmpi.sh: fill a folder with Debian's Open MPI 4.1 runtime (mpirun, orted, the libraries
# and the MCA components a single-node job uses), its headers and mpicc wrapper (so CMake's FindMPI
# can build against it), and Check (static, for the test binaries), all extracted from the .deb
# files with `apt-get download` + `dpkg -x` -- nothing is installed. The folder is made to travel
# to the GPU machine, which has no MPI, no Check and no network (the device tool's `carry`, 64 MiB
# in all: this script fails when the folder is larger).
#
#   scripts/carry-openmpi.sh [DEST]        DEST defaults to build-carry/openmpi (ignored by git:
#                                          /build*/), or $DA_CARRIED_MPI when set
#   . DEST/env.sh                          on the other machine: PATH, LD_LIBRARY_PATH, OPAL_PREFIX,
#                                          PKG_CONFIG_PATH, CMAKE_PREFIX_PATH, MPI_HOME; exports
#                                          DA_CARRIED_MPI=DEST (absolute, computed where it is sourced)
#
# What is left out on purpose (and why mpirun does not miss it): the network components that need
# InfiniBand / OFI / UCX / PSM libraries (btl openib/ofi, mtl ofi/psm/psm2, pml/osc/atomic/spml ucx:
# one node uses the shared-memory btl vader), OpenSHMEM, Fortran and Java bindings, man pages.
# Not carried: OpenBLAS (optional to the build; only `distattn kernel`'s sgemm ratio uses it) and
# glibc: the libraries are Debian 12's and need glibc >= 2.34 there (env.sh checks and says so).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-${DA_CARRIED_MPI:-$ROOT/build-carry/openmpi}}
LIMIT=$((64 * 1024 * 1024))
PKGS="openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev libpmix2 libhwloc15 libevent-core-2.1-7
      libevent-pthreads-2.1-7 libevent-2.1-7 libudev1 zlib1g check libsubunit-dev libsubunit0 libhwloc-dev
      pkgconf pkgconf-bin libpkgconf3 pkg-config"

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
echo "carry-openmpi: downloading $(echo $PKGS | wc -w) packages"
# apt-get download writes into the current directory; the _apt sandbox user may not write to a
# mktemp folder, so it runs as root there (a warning only).
(cd "$debs" && apt-get download -q $PKGS 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
n=$(ls "$debs"/*.deb 2>/dev/null | wc -l)
[ "$n" -eq "$(echo $PKGS | wc -w)" ] || { echo "carry-openmpi: got $n .deb files of $(echo $PKGS | wc -w) (apt-get update first?)" >&2; exit 1; }
rm -rf "$DEST/usr" "$DEST/etc" "$DEST/lib"
for d in "$debs"/*.deb; do dpkg -x "$d" "$DEST"; done

# ---- prune what a single-node job never loads -----------------------------------------------------
L=$DEST/usr/lib/x86_64-linux-gnu
C=$L/openmpi/lib/openmpi3
rm -rf "$DEST/usr/share/man" "$DEST/usr/share/doc" "$DEST/usr/share/lintian" "$DEST/usr/share/bug" \
  "$DEST/usr/share/aclocal" "$L/fortran" "$L/openmpi/lib/"*.mod "$DEST/usr/share/java" "$L/jni" 2>/dev/null || true
rm -f "$C"/mca_{btl_openib,btl_ofi,mtl_ofi,mtl_psm,mtl_psm2,pml_ucx,osc_ucx,atomic_ucx,atomic_basic,spml_ucx}.so \
  "$C"/mca_{sshmem_ucx,sshmem_mmap,sshmem_sysv,memheap_buddy,memheap_ptmalloc,scoll_basic,scoll_mpi,reachable_netlink}.so
rm -f "$L"/liboshmem.so* "$L"/libmpi_java.so* "$L"/libmpi_mpifh*.so* "$L"/libmpi_usempi*.so* \
  "$L"/libmca_common_{ucx,verbs,ofi}.so* "$L"/lib*.a.unused 2>/dev/null || true
rm -f "$DEST"/usr/bin/{osh,shmem,mpif,mpijava}* "$DEST"/usr/share/openmpi/{mpif,osh,shmem}*
# The plain names Debian gives through update-alternatives (not in the packages): mpirun, mpicc...
# opal_wrapper reads <its name>-wrapper-data.txt, so the wrapper's data gets the plain name too.
for n in mpirun mpiexec mpicc mpicxx mpic++; do
  [ -e "$DEST/usr/bin/$n.openmpi" ] && ln -sfn "$n.openmpi" "$DEST/usr/bin/$n"
  w=$DEST/usr/share/openmpi/$n.openmpi-wrapper-data.txt
  [ -e "$w" ] && [ ! -e "$DEST/usr/share/openmpi/$n-wrapper-data.txt" ] && ln -sfn "$n.openmpi-wrapper-data.txt" "$DEST/usr/share/openmpi/$n-wrapper-data.txt"
done
# Static archives of MPI are not needed (shared build); Check's are (it ships no shared library).
find "$L" -maxdepth 1 -name 'lib*.a' ! -name 'libcheck*.a' ! -name 'libsubunit.a' -delete
# Any component left that needs a library that is not here would print warnings at every start.
missing=0
for so in "$C"/*.so "$L"/pmix2/lib/pmix/*.so; do
  for need in $(readelf -d "$so" 2>/dev/null | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'); do
    case $need in libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*) continue ;; esac
    found=0
    for dir in "$L" "$L/openmpi/lib" "$DEST/lib/x86_64-linux-gnu"; do [ -e "$dir/$need" ] && found=1; done
    if [ $found -eq 0 ]; then
      echo "carry-openmpi: dropping $(basename "$so"): needs $need" >&2
      rm -f "$so"; missing=$((missing + 1)); break
    fi
  done
done

# ---- symbolic links: relative, and pointing inside the folder --------------------------------------
# (the device tool carries links as links: an absolute one would point at the other machine's /usr)
while IFS= read -r link; do
  tgt=$(readlink "$link")
  case $tgt in
    /*) if [ -e "$DEST$tgt" ]; then ln -sfn "$(realpath --relative-to="$(dirname "$link")" "$DEST$tgt")" "$link"
        else rm -f "$link"; fi ;;
  esac
done < <(find "$DEST" -type l)
find "$DEST" -xtype l -delete # links into what was pruned

# ---- pkg-config files (Check, hwloc, ompi-c): their prefix is the carried folder, via ${pcfiledir} ----
for pc in "$L"/pkgconfig/*.pc; do
  [ -L "$pc" ] && cp --remove-destination "$(readlink -f "$pc")" "$pc" # ${pcfiledir} is where it is found
  sed -i 's|^prefix=/usr$|prefix=${pcfiledir}/../../..|' "$pc"
done

# ---- mpirun as root (the device machine runs commands as root) and the relocated prefix ------------
cat > "$DEST/env.sh" <<'EOF'
# Source me (bash): the carried Open MPI and Check (scripts/carry-openmpi.sh) on PATH and the library
# path, relocated to wherever this folder now is. Exports DA_CARRIED_MPI (this folder).
_d=${BASH_SOURCE[0]%/*}; [ "$_d" = "${BASH_SOURCE[0]}" ] && _d=.   # no dirname: PATH may be bare
DA_CARRIED_MPI=$(cd "$_d" && pwd); unset _d
export DA_CARRIED_MPI
export OPAL_PREFIX=$DA_CARRIED_MPI/usr                 # Open MPI finds its components and help files
export OPAL_SYSCONFDIR=$DA_CARRIED_MPI/etc/openmpi     # Debian's sysconfdir is /etc, outside the prefix
export OPAL_LIBDIR=$DA_CARRIED_MPI/usr/lib/x86_64-linux-gnu/openmpi/lib
export OPAL_PKGLIBDIR=$OPAL_LIBDIR/openmpi3
export OPAL_INCLUDEDIR=$DA_CARRIED_MPI/usr/lib/x86_64-linux-gnu/openmpi/include
export PMIX_INSTALL_PREFIX=$DA_CARRIED_MPI/usr         # PMIx's own plugins (pmix2/lib/pmix)
export PMIX_MCA_mca_base_component_path=$DA_CARRIED_MPI/usr/lib/x86_64-linux-gnu/pmix2/lib/pmix
export PATH=$DA_CARRIED_MPI/usr/bin${PATH:+:$PATH}
export LD_LIBRARY_PATH=$DA_CARRIED_MPI/usr/lib/x86_64-linux-gnu:$DA_CARRIED_MPI/usr/lib/x86_64-linux-gnu/openmpi/lib:$DA_CARRIED_MPI/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PKG_CONFIG_PATH=$DA_CARRIED_MPI/usr/lib/x86_64-linux-gnu/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export CMAKE_PREFIX_PATH=$DA_CARRIED_MPI/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
export MPI_HOME=$DA_CARRIED_MPI/usr                    # CMake FindMPI: use the carried mpicc
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
# One node, shared memory: name the components so nothing probes for networks that are not carried.
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp OMPI_MCA_osc=sm,pt2pt
# One node and no ssh there: the launcher that starts local ranks without an rsh agent.
export OMPI_MCA_plm=isolated
# Debian 12 libraries: glibc 2.36 there is safe; older than 2.34 fails at load time.
_g=$(getconf GNU_LIBC_VERSION 2>/dev/null); _g=${_g#glibc }
case $_g in 2.[0-9]|2.[12][0-9]|2.3[0-3]) echo "carried Open MPI: glibc $_g here, the carried libraries need >= 2.34" >&2 ;; esac
unset _g
EOF
mkdir -p "$DEST/etc/openmpi"
bytes=$(du -sb "$DEST" | cut -f1)
echo "carry-openmpi: $DEST holds $((bytes / 1024 / 1024)) MiB ($bytes bytes; limit 64 MiB)${missing:+, $missing components dropped}"
[ "$bytes" -le "$LIMIT" ] || { echo "carry-openmpi: over the 64 MiB carry limit" >&2; exit 1; }
echo "carry-openmpi: use: . $DEST/env.sh   (device tool: carry [\"${DEST#$ROOT/}\"])"
