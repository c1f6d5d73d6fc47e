# mpi.cmake: MPI test drivers (label mpi), included by tests/CMakeLists.txt when da_comm exists.
# Each suite runs under mpirun for P in {1,2,3,4,5,8}, oversubscribed (more ranks than cores),
# with mpirun's own --timeout as the hang guard: Check's timeouts do not work in CK_NOFORK mode.
find_program(DA_MPIRUN NAMES mpirun.openmpi mpirun)
if(NOT DA_MPIRUN)
  message(STATUS "distattn: no mpirun found, MPI tests not registered")
  return()
endif()

set(DA_MPI_TEST_ENV
    "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1;OMPI_MCA_mpi_yield_when_idle=1")

add_executable(test_ring test_ring.c)
target_link_libraries(test_ring PRIVATE da_comm da_ref da_core Check::check MPI::MPI_C m)
foreach(P 1 2 3 4 5 8)
  add_test(NAME test_ring_np${P}
           COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 300 -np ${P} $<TARGET_FILE:test_ring>)
  set_tests_properties(test_ring_np${P} PROPERTIES LABELS mpi TIMEOUT 330 ENVIRONMENT "${DA_MPI_TEST_ENV}")
endforeach()

# Decode over the distributed paged KV cache (tree | ring), tests/test_tree.c.
if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_tree.c)
  add_executable(test_tree test_tree.c)
  target_link_libraries(test_tree PRIVATE da_comm da_ref da_core Check::check MPI::MPI_C m)
  foreach(P 1 2 3 4 5 8)
    add_test(NAME test_tree_np${P}
             COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 120 -np ${P} $<TARGET_FILE:test_tree>)
    set_tests_properties(test_tree_np${P} PROPERTIES LABELS mpi TIMEOUT 150 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endforeach()
endif()
