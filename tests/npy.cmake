# npy.cmake: `distattn run --input DIR --output DIR` (.npy through MPI-IO; issue 8) and its bad
# inputs (issue 10), driven by tests/test_npy_io.py with Debian's NumPy (/usr/bin/python3, or
# DISTATTN_PYTHON). Label mpi: P = 3 mpirun. npy_roundtrip_np3 compares out/lse/dq/dk/dv with the
# script's own float64 attention for ring, striped and zigzag (about 10 s); each npy_bad_* case
# breaks one thing and expects the exit code and the file and field named on every rank.
# Exit 77 (skipped, with the reason printed) only where NumPy is not installed.
find_program(DA_NPY_MPIRUN NAMES mpirun.openmpi mpirun)
if(NOT TARGET distattn OR NOT TARGET da_comm OR NOT DA_NPY_MPIRUN)
  return()
endif()
set(DISTATTN_PYTHON /usr/bin/python3 CACHE FILEPATH "Python interpreter for the python tests")
set(da_npy_cmd ${DISTATTN_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/test_npy_io.py --exe $<TARGET_FILE:distattn>
               --mpirun ${DA_NPY_MPIRUN} --work ${CMAKE_CURRENT_BINARY_DIR}/npy)
add_test(NAME npy_roundtrip_np3 COMMAND ${da_npy_cmd} roundtrip)
set_tests_properties(npy_roundtrip_np3 PROPERTIES LABELS mpi TIMEOUT 150 SKIP_RETURN_CODE 77
                     PASS_REGULAR_EXPRESSION "PASS")
foreach(case missing missing_dout is_dir magic truncated oversized dtype dtype_mismatch dtype_flag big_endian fortran
             seq_mismatch seq_flag gqa ndim out_missing out_not_writable no_clobber no_clobber_bad_input fifo device)
  add_test(NAME npy_bad_${case} COMMAND ${da_npy_cmd} bad ${case})
  set_tests_properties(npy_bad_${case} PROPERTIES LABELS mpi TIMEOUT 90 SKIP_RETURN_CODE 77)
endforeach()
