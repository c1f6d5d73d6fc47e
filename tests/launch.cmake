# launch.cmake: the launcher milestone's tests (issue 8), included by tests/CMakeLists.txt.
#  - test_place (unit): placement decisions on the DGX-like XML of tests/topo and synthetic nodes.
#  - test_gpumap (unit): the rank -> GPU map of --device cuda / --ranks-per-gpu.
#  - slurm_* (slurm): the sbatch scripts of slurm/ on a real local Slurm (slurm/local-cluster.sh).
#  - netns_* (netns): distattn run across network-namespace hosts; exit 77 = skipped.
if(HWLOC_FOUND AND EXISTS ${PROJECT_SOURCE_DIR}/launcher/place.c)
  add_executable(test_place test_place.c ${PROJECT_SOURCE_DIR}/launcher/place.c)
  target_include_directories(test_place PRIVATE ${PROJECT_SOURCE_DIR}/launcher)
  target_compile_definitions(test_place PRIVATE DA_TOPO_DIR="${CMAKE_CURRENT_SOURCE_DIR}/topo")
  target_link_libraries(test_place PRIVATE PkgConfig::HWLOC Check::check da_options)
  add_test(NAME test_place COMMAND test_place)
  set_tests_properties(test_place PROPERTIES LABELS unit TIMEOUT 120)
endif()
# test_gpumap (unit): the rank -> GPU map of --device cuda (launcher/gpumap.c), no MPI, no GPU.
add_executable(test_gpumap test_gpumap.c ${PROJECT_SOURCE_DIR}/launcher/gpumap.c)
target_include_directories(test_gpumap PRIVATE ${PROJECT_SOURCE_DIR}/launcher)
target_link_libraries(test_gpumap PRIVATE Check::check da_options)
add_test(NAME test_gpumap COMMAND test_gpumap)
set_tests_properties(test_gpumap PROPERTIES LABELS unit TIMEOUT 60)

# ---- slurm: the job scripts on a real local Slurm (root, slurm-wlm, munge; else skipped) ----
if(TARGET distattn AND EXISTS ${PROJECT_SOURCE_DIR}/slurm/local-cluster.sh)
  foreach(case one_node multi_node mpirun sweep hetjob)
    add_test(NAME slurm_${case}
             COMMAND timeout -k 5 110 ${CMAKE_CURRENT_SOURCE_DIR}/slurm_test.sh ${case} ${PROJECT_BINARY_DIR}
                     ${PROJECT_SOURCE_DIR})
    # one cluster at a time (fixed ports); 77 = skipped
    set_tests_properties(slurm_${case} PROPERTIES LABELS slurm TIMEOUT 120 SKIP_RETURN_CODE 77
                         RESOURCE_LOCK distattn_slurm)
  endforeach()
endif()

# ---- netns: distattn run across 3 emulated hosts (network namespaces, tbf-shaped 1 Gbit/s
# links, mpirun through plm_rsh_agent); 77 = skipped where namespaces are not permitted ----
if(TARGET distattn AND TARGET da_comm)
  add_test(NAME netns_run_3hosts COMMAND timeout -k 5 120 ${CMAKE_CURRENT_SOURCE_DIR}/netns_test.sh
                                         ${PROJECT_BINARY_DIR} 3 1gbit)
  set_tests_properties(netns_run_3hosts PROPERTIES LABELS netns TIMEOUT 130 SKIP_RETURN_CODE 77)
endif()
