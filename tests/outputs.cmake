# outputs.cmake: lost or corrupted outputs (issue 19, class 3), tests/test_outputs.py: --output on
# a full file system and on a read-only mount (a tmpfs / bind mount in a private mount namespace:
# unshare -m as root, else skipped with exit 77), --json on /dev/full, an output name that is a
# directory, --json / DISTATTN_DEBUG_FILE / --output naming an input or another output (by path,
# symbolic and hard link), SIGINT before and inside the commit of the output set, SIGKILL inside
# it and the next run's recovery. Label mpi; about 2 s each.
find_program(DA_OUT_MPIRUN NAMES mpirun.openmpi mpirun)
if(NOT TARGET distattn OR NOT TARGET da_comm OR NOT DA_OUT_MPIRUN)
  return()
endif()
set(DISTATTN_PYTHON /usr/bin/python3 CACHE FILEPATH "Python interpreter for the python tests")
foreach(case full_disk json_full read_only dir_as_output collide_json_input collide_json_output collide_json_symlink
             collide_debug_json collide_debug_input collide_output_hardlink collide_kernel_debug_json sigint_write
             sigint_commit kill_commit)
  add_test(NAME out_${case}
           COMMAND ${DISTATTN_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/test_outputs.py --exe $<TARGET_FILE:distattn>
                   --mpirun ${DA_OUT_MPIRUN} --work ${CMAKE_CURRENT_BINARY_DIR}/outputs ${case})
  set_tests_properties(out_${case} PROPERTIES LABELS mpi TIMEOUT 120 SKIP_RETURN_CODE 77 PASS_REGULAR_EXPRESSION "PASS")
endforeach()
