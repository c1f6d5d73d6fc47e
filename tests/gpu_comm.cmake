# gpu_comm.cmake: the device seam and the device transports (comm/devapi.h, comm/ipc.c) under
# mpirun; included by tests/CMakeLists.txt after mpi.cmake (which finds mpirun and sets the env).
# test_ipc runs the cuda-ipc protocol on the host table (POSIX shared memory): label mpi, no GPU.
if(NOT DA_MPIRUN)
  return()
endif()
add_executable(test_ipc test_ipc.c)
target_link_libraries(test_ipc PRIVATE da_comm da_core Check::check MPI::MPI_C m)
foreach(P 2 3 5)
  add_test(NAME test_ipc_np${P}
           COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 120 -np ${P} $<TARGET_FILE:test_ipc>)
  set_tests_properties(test_ipc_np${P} PROPERTIES LABELS mpi TIMEOUT 150 ENVIRONMENT "${DA_MPI_TEST_ENV}")
endforeach()

# The host-memory drivers refuse a device transport in words (exit 2 on every rank), and an
# unknown name lists the transports this build has.
if(TARGET distattn AND COMMAND da_run_cli)
  da_run_cli(cli_transport_device_refused 2 2 ENV DISTATTN_TRANSPORT=host-ipc
             ERR_RE "rank [01]: plan: unsupported: plan config: the host-ipc transport moves device memory"
             ARGS --seq 1000 --heads 2 --dim 64)
  da_run_cli(cli_transport_unknown 2 2 ENV DISTATTN_TRANSPORT=bogus
             ERR_RE "unknown transport 'bogus' \\(built: mpi, self, [a-z, -]*host-ipc\\)"
             ARGS --seq 1000 --heads 2 --dim 64)
endif()

# test_nccl: where the CUDA runtime and NCCL are built. Without a GPU (here, CI) it checks the
# bootstrap (ncclGetUniqueId over MPI) and that opening nccl and cuda-ipc fails fast on every
# rank naming CUDA; with one it runs a ring exchange on each transport (label gpu).
get_property(DA_TEST_NCCL GLOBAL PROPERTY DA_COMM_NCCL_LIBRARY)
if(DA_TEST_NCCL)
  add_executable(test_nccl test_nccl.c)
  target_link_libraries(test_nccl PRIVATE da_comm da_core Check::check MPI::MPI_C m)
  foreach(P 1 2 3)
    add_test(NAME test_nccl_np${P}
             COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 100 -np ${P} $<TARGET_FILE:test_nccl>)
    set_tests_properties(test_nccl_np${P} PROPERTIES LABELS "mpi;gpu" TIMEOUT 130 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endforeach()
endif()
