# gpu_comm.cmake: the device seam and the device transports (comm/devapi.h, comm/ipc.c) under
# mpirun; included by tests/CMakeLists.txt after mpi.cmake (which finds mpirun and sets the env).
# test_ipc runs the cuda-ipc protocol on the host table (POSIX shared memory): label mpi, no GPU.
if(NOT DA_MPIRUN)
  return()
endif()
add_executable(test_ipc test_ipc.c)
target_link_libraries(test_ipc PRIVATE da_comm da_core Check::check MPI::MPI_C m)
foreach(P 1 2 3 5)
  add_test(NAME test_ipc_np${P}
           COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 120 -np ${P} $<TARGET_FILE:test_ipc>)
  set_tests_properties(test_ipc_np${P} PROPERTIES LABELS mpi TIMEOUT 150 ENVIRONMENT "${DA_MPI_TEST_ENV}")
endforeach()

# DISTATTN_TRANSPORT=host-ipc: `distattn run` takes the device path with the test device (the host seam:
# inputs copied to "device" memory, the ring on it, outputs copied back), verified, with peak device memory in
# the table and the JSON; ulysses refuses a device transport in words (exit 2 on every rank); an unknown name
# lists the transports this build has. --device cuda without a GPU (or without the CUDA build) fails fast on
# every rank, naming CUDA, exit 2.
# An unknown DISTATTN_TRANSPORT name is refused naming the variable and the transport names (the env table,
# core/env.c; `--transport bogus` still lists the transports this build has).
if(TARGET distattn AND COMMAND da_run_cli)
  da_run_cli(cli_transport_device_run 3 0 ENV DISTATTN_TRANSPORT=host-ipc
             OUT_RE "transport: host-ipc \\(host seam memory: a test device\\).*dev_MB.*# wrong: 0.# PASS"
             JSON ${CMAKE_CURRENT_BINARY_DIR}/cli_device_run.jsonl
             JSON_RE "\"algo\":\"striped\",\"ranks\":3,.*\"wrong\":0,.*\"transport\":\"host-ipc\",\"peak_device_bytes\":[1-9][0-9]*"
             ARGS --algo striped --seq 1001 --heads 4 --kv-heads 1 --dim 64 --mask causal --backward --verify 4
                  --iters 1 --warmup 0 --json ${CMAKE_CURRENT_BINARY_DIR}/cli_device_run.jsonl)
  da_run_cli(cli_transport_device_refused 2 2 ENV DISTATTN_TRANSPORT=host-ipc
             ERR_RE "rank [01]: plan: unsupported: plan config \\(ulysses\\): the host-ipc transport moves device memory"
             ARGS --algo ulysses --seq 1000 --heads 2 --dim 64)
  da_run_cli(cli_device_cuda_no_gpu 2 2 ERR_RE "--device cuda: .*CUDA"
             ARGS --seq 1000 --heads 2 --dim 64 --device cuda --dtype bf16)
  # The staged mpi transport (comm/staged.c): on the host seam (host-mpi) a verified run, forward and
  # backward, its pinned staging in the table's note and the JSON; --device cuda --transport mpi (the
  # staged cuda-mpi) without a GPU fails fast on every rank naming CUDA, exit 2, like the default.
  da_run_cli(cli_transport_staged_run 3 0
             OUT_RE "transport: host-mpi \\(host seam memory: a test device, staged through pinned host buffers\\).*dev_MB.*# pinned: [0-9.]+ MiB of pinned host staging per rank.*# wrong: 0.# PASS"
             JSON ${CMAKE_CURRENT_BINARY_DIR}/cli_staged_run.jsonl
             JSON_RE "\"algo\":\"zigzag\",\"ranks\":3,.*\"wrong\":0,.*\"transport\":\"host-mpi\",\"peak_device_bytes\":[1-9][0-9]*,\"peak_pinned_bytes\":[1-9][0-9]*"
             ARGS --algo zigzag --seq 1001 --heads 4 --kv-heads 2 --dim 64 --mask causal --dtype bf16 --backward
                  --verify 4 --iters 1 --warmup 0 --transport host-mpi --json ${CMAKE_CURRENT_BINARY_DIR}/cli_staged_run.jsonl)
  da_run_cli(cli_device_cuda_mpi_no_gpu 2 2 ERR_RE "--device cuda: .*CUDA"
             ARGS --seq 1000 --heads 2 --dim 64 --device cuda --dtype bf16 --transport mpi)
  da_run_cli(cli_transport_unknown 2 2 ENV DISTATTN_TRANSPORT=bogus
             ERR_RE "DISTATTN_TRANSPORT=bogus: expected one of mpi\\|self\\|cuda-ipc\\|nccl\\|host-ipc"
             ARGS --seq 1000 --heads 2 --dim 64)
endif()

# test_nccl: where the CUDA runtime and NCCL are built. Without a GPU (here, CI) it checks the
# bootstrap (ncclGetUniqueId over MPI) and that opening nccl and cuda-ipc fails fast on every
# rank naming CUDA; with one it runs a ring exchange on each transport. Label mpi only: its
# checks without a GPU are the ones CI must run, so it never exits 77.
get_property(DA_TEST_NCCL GLOBAL PROPERTY DA_COMM_NCCL_LIBRARY)
if(DA_TEST_NCCL)
  add_executable(test_nccl test_nccl.c)
  target_link_libraries(test_nccl PRIVATE da_comm da_core Check::check MPI::MPI_C m)
  foreach(P 1 2 3)
    add_test(NAME test_nccl_np${P}
             COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 100 -np ${P} $<TARGET_FILE:test_nccl>)
    set_tests_properties(test_nccl_np${P} PROPERTIES LABELS mpi TIMEOUT 130 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endforeach()
endif()

# --transport on the command line: the name reaches the plan (run at one rank on self, the header
# says so) and the decode plan (a device transport refused in words, exit 2).
if(TARGET distattn AND COMMAND da_run_cli AND COMMAND da_decode_cli)
  da_run_cli(cli_transport_flag_self 1 0 OUT_RE "transport: self \\(host memory\\).*# wrong: 0.# PASS"
             ARGS --seq 1000 --heads 2 --dim 64 --transport self)
  da_run_cli(cli_transport_flag_unknown 2 2 ERR_RE "unknown transport 'bogus' \\(built: mpi, self"
             ARGS --seq 1000 --heads 2 --dim 64 --transport bogus)
  # The device tree on the host seam: pages and partials in host-ipc's memory, two allreduces;
  # only the flat tree is built there (the ring and the two-level tree are refused in words).
  da_decode_cli(cli_decode_device_tree_host_ipc 3 0
                OUT_RE "combine: device tree on host-ipc \\(host memory\\).*# wrong: 0.# PASS"
                ARGS --context 1001 --batch 2 --heads 8 --kv-heads 2 --dim 64 --steps 3 --verify 8 --transport host-ipc)
  # The same over the staged mpi transport: partials copied to pinned host memory, reduced by MPI.
  da_decode_cli(cli_decode_device_tree_host_mpi 3 0
                OUT_RE "transport: host-mpi \\(staged through pinned host buffers\\).*combine: device tree on host-mpi \\(host memory\\).*# wrong: 0.# PASS"
                ARGS --context 1001 --batch 2 --heads 8 --kv-heads 2 --dim 64 --steps 3 --verify 8 --transport host-mpi)
  da_decode_cli(cli_decode_transport_refused 2 2
                ERR_RE "decode config: on the host-ipc transport \\(device memory\\) only the flat tree is built"
                ARGS --context 1000 --heads 2 --dim 64 --transport host-ipc --algo ring)
endif()

# bench/gpu-ring-check.sh, the prepared device check of the device ring: on a machine without a GPU it
# must stop at its first step with exit 77 (with a GPU, DA_RING_CHECK_PROBE_ONLY=1 stops it after the probe
# with 0); anything else (a syntax error, a failing step) fails this test.
add_test(NAME gpu_ring_check_probe
         COMMAND sh -c "DA_RING_CHECK_PROBE_ONLY=1 OUT=\"$0\" \"$1\"; rc=$?; echo \"exit $rc\"; [ $rc -eq 77 ] || [ $rc -eq 0 ]"
                 ${CMAKE_CURRENT_BINARY_DIR}/gpu-ring-check-probe ${PROJECT_SOURCE_DIR}/bench/gpu-ring-check.sh)
set_tests_properties(gpu_ring_check_probe PROPERTIES LABELS unit TIMEOUT 60
                     PASS_REGULAR_EXPRESSION "no GPU here.*exit 77|probe only: stopping.*exit 0")

# test_devapi_sweep: the host table removes the segments of processes that ended without freeing
# them (killed, or exited), and only theirs; in a /dev/shm of its own (tests/private_shm.sh: a
# private mount namespace, root only, else skipped), so that no other test's process sweeps first.
add_executable(test_devapi_sweep test_devapi_sweep.c)
target_link_libraries(test_devapi_sweep PRIVATE da_comm da_core Check::check MPI::MPI_C m)
add_test(NAME test_devapi_sweep COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/private_shm.sh $<TARGET_FILE:test_devapi_sweep>)
set_tests_properties(test_devapi_sweep PROPERTIES LABELS unit TIMEOUT 60 SKIP_RETURN_CODE 77)
