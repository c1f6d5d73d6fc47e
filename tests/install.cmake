# install.cmake: `make install PREFIX=<temporary folder>` from this build, then programs outside the
# tree built against the installed files only: with pkg-config (shared and --static) and with
# find_package(distattn) (tests/install/), run under mpirun; and the installed library exports
# exactly the functions of include/distattn.h. Label install.
find_program(DA_MPIRUN NAMES mpirun.openmpi mpirun)
find_program(DA_MAKE NAMES make gmake)
if(NOT DA_MPIRUN OR NOT DA_MAKE OR NOT TARGET da_comm OR NOT TARGET distattn_shared)
  return()
endif()
add_test(NAME test_install
         COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/install/check.sh ${PROJECT_BINARY_DIR} ${PROJECT_SOURCE_DIR}
                 ${DA_MPIRUN} ${CMAKE_COMMAND} ${DA_MAKE} ${CMAKE_C_COMPILER})
set_tests_properties(test_install PROPERTIES LABELS install TIMEOUT 300
  ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
