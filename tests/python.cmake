# python.cmake: the Python binding and the examples (included by tests/CMakeLists.txt when the
# shared library exists). Label python: tests/test_python.py under mpirun with Debian's
# python3-numpy and python3-mpi4py on /usr/bin/python3 (DISTATTN_PYTHON overrides), against the
# library of this build (DISTATTN_LIBRARY). The examples run as tests too: C ones label mpi.
find_program(DA_MPIRUN NAMES mpirun.openmpi mpirun)
if(NOT DA_MPIRUN OR NOT TARGET da_comm)
  return()
endif()
set(DISTATTN_PYTHON /usr/bin/python3 CACHE FILEPATH "Python interpreter for the python tests")
set(DA_PY_ENV "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1"
              "OMPI_MCA_mpi_yield_when_idle=1;DISTATTN_LIBRARY=$<TARGET_FILE:distattn_shared>"
              "PYTHONPATH=${PROJECT_SOURCE_DIR}/python;PYTHONDONTWRITEBYTECODE=1")
set(DA_MPIRUN_ARGS --oversubscribe --bind-to none --timeout 120)

# The ctypes mirrors of the public structs are checked against this program's sizes and offsets.
add_executable(python_abi python_abi.c)
target_link_libraries(python_abi PRIVATE distattn_shared MPI::MPI_C)

execute_process(COMMAND ${DISTATTN_PYTHON} -c "import numpy, mpi4py" RESULT_VARIABLE DA_PY_RC
                OUTPUT_QUIET ERROR_QUIET)
foreach(P 1 3)
  if(DA_PY_RC EQUAL 0)
    add_test(NAME test_python_np${P}
             COMMAND ${DA_MPIRUN} ${DA_MPIRUN_ARGS} -np ${P} ${DISTATTN_PYTHON}
                     ${CMAKE_CURRENT_SOURCE_DIR}/test_python.py --abi $<TARGET_FILE:python_abi>)
  else()
    # Skipped (77), not failed, on a machine without them; scripts/setup-deps.sh installs them.
    add_test(NAME test_python_np${P}
             COMMAND sh -c "echo '${DISTATTN_PYTHON} lacks numpy or mpi4py (apt install python3-numpy python3-mpi4py)'; exit 77")
  endif()
  set_tests_properties(test_python_np${P} PROPERTIES LABELS python TIMEOUT 150 SKIP_RETURN_CODE 77
                       ENVIRONMENT "${DA_PY_ENV}")
endforeach()

if(DA_PY_RC EQUAL 0)
  add_test(NAME example_train_step_py_np3
           COMMAND ${DA_MPIRUN} ${DA_MPIRUN_ARGS} -np 3 ${DISTATTN_PYTHON} ${PROJECT_SOURCE_DIR}/examples/train_step.py)
  add_test(NAME example_decode_loop_py_np3
           COMMAND ${DA_MPIRUN} ${DA_MPIRUN_ARGS} -np 3 ${DISTATTN_PYTHON} ${PROJECT_SOURCE_DIR}/examples/decode_loop.py tree 4)
  set_tests_properties(example_train_step_py_np3 example_decode_loop_py_np3 PROPERTIES LABELS python TIMEOUT 150
                       ENVIRONMENT "${DA_PY_ENV}" PASS_REGULAR_EXPRESSION "# PASS" FAIL_REGULAR_EXPRESSION "FAIL")
endif()

# Python objects created with a timeout while rank 2 never calls (issue 19, class 2): DistattnError
# "timeout" within the bound, the missing rank named where the library can (tests/test_python_deadline.py;
# about 16 s, run alone: its limits are wall-clock times).
if(DA_PY_RC EQUAL 0)
  add_test(NAME test_python_deadline_np3
           COMMAND ${DA_MPIRUN} ${DA_MPIRUN_ARGS} -np 3 ${DISTATTN_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/test_python_deadline.py)
  set_tests_properties(test_python_deadline_np3 PROPERTIES LABELS python TIMEOUT 60 ENVIRONMENT "${DA_PY_ENV}"
                       PASS_REGULAR_EXPRESSION "# PASS" FAIL_REGULAR_EXPRESSION "FAIL|corrupted|free\\(\\)")
endif()

# The C examples (built in examples/ against libdistattn.so): verified results, exit code 0.
if(TARGET example_train_step)
  add_test(NAME example_train_step_np3 COMMAND ${DA_MPIRUN} ${DA_MPIRUN_ARGS} -np 3 $<TARGET_FILE:example_train_step>)
  add_test(NAME example_train_step_np1 COMMAND ${DA_MPIRUN} ${DA_MPIRUN_ARGS} -np 1 $<TARGET_FILE:example_train_step>)
  set_tests_properties(example_train_step_np3 example_train_step_np1 PROPERTIES LABELS mpi TIMEOUT 150
                       ENVIRONMENT "${DA_PY_ENV}")
endif()
if(TARGET example_decode_loop)
  add_test(NAME example_decode_loop_tree_np3
           COMMAND ${DA_MPIRUN} ${DA_MPIRUN_ARGS} -np 3 $<TARGET_FILE:example_decode_loop> tree 6)
  add_test(NAME example_decode_loop_ring_np4
           COMMAND ${DA_MPIRUN} ${DA_MPIRUN_ARGS} -np 4 $<TARGET_FILE:example_decode_loop> ring 6)
  set_tests_properties(example_decode_loop_tree_np3 example_decode_loop_ring_np4 PROPERTIES LABELS mpi TIMEOUT 150
                       ENVIRONMENT "${DA_PY_ENV}")
endif()

# ---- PyTorch (issue 21): distattn.torch with real torch, from the venv scripts/setup-torch.sh
# makes outside the tree (`make test` runs it). tests/torch_env.sh turns a venv missing because
# the package index was unreachable into a loud skip (77), any other absence into a failure.
if(DEFINED ENV{DISTATTN_TORCH_VENV})
  set(DA_TORCH_VENV_DEFAULT "$ENV{DISTATTN_TORCH_VENV}")
else()
  set(DA_TORCH_VENV_DEFAULT "$ENV{HOME}/.cache/distattn/venv-torch")
endif()
set(DISTATTN_TORCH_PYTHON "${DA_TORCH_VENV_DEFAULT}/bin/python" CACHE FILEPATH
    "Python of the torch venv (scripts/setup-torch.sh) for the torch tests")
set(DA_TORCH_RUN sh ${CMAKE_CURRENT_SOURCE_DIR}/torch_env.sh ${DISTATTN_TORCH_PYTHON})
# mpirun's own limit below ctest's: importing torch alone takes seconds per rank on a loaded machine.
set(DA_TORCH_MPIRUN_ARGS --oversubscribe --bind-to none --timeout 540)
# One kernel thread per rank: up to 4 ranks share 2 cores, and spinning OpenMP teams of 2 threads
# per rank slowed each ring step 20-fold.
set(DA_TORCH_ENV ${DA_PY_ENV} "DISTATTN_NTHREADS=1")
# Forward and backward against float64 SDPA at P = 1..4 (the unmapped-group case runs at P = 1).
foreach(P 1 2 3 4)
  add_test(NAME test_torch_np${P}
           COMMAND ${DA_TORCH_RUN} ${DA_MPIRUN} ${DA_TORCH_MPIRUN_ARGS} -np ${P} ${DISTATTN_TORCH_PYTHON}
                   ${CMAKE_CURRENT_SOURCE_DIR}/test_torch.py)
  set_tests_properties(test_torch_np${P} PROPERTIES LABELS python TIMEOUT 600 SKIP_RETURN_CODE 77
                       ENVIRONMENT "${DA_TORCH_ENV}")
endforeach()
# The acceptance run: 20 AdamW steps of a Llama-style block, zigzag over 4 ranks, vs float64.
add_test(NAME example_train_llama_block_np4
         COMMAND ${DA_TORCH_RUN} ${DA_MPIRUN} ${DA_TORCH_MPIRUN_ARGS} -np 4 ${DISTATTN_TORCH_PYTHON}
                 ${PROJECT_SOURCE_DIR}/examples/train_llama_block.py)
set_tests_properties(example_train_llama_block_np4 PROPERTIES LABELS python TIMEOUT 600 SKIP_RETURN_CODE 77
                     ENVIRONMENT "${DA_TORCH_ENV}" PASS_REGULAR_EXPRESSION "# PASS" FAIL_REGULAR_EXPRESSION "FAIL")
# The wheel: built by its backend, installed into a fresh venv, used from elsewhere under mpirun.
add_test(NAME test_python_wheel
         COMMAND ${DA_TORCH_RUN} sh ${CMAKE_CURRENT_SOURCE_DIR}/wheel_test.sh ${DISTATTN_TORCH_PYTHON}
                 ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR} ${DA_MPIRUN})
set_tests_properties(test_python_wheel PROPERTIES LABELS python TIMEOUT 900 SKIP_RETURN_CODE 77
                     ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1;OMPI_MCA_mpi_yield_when_idle=1;DISTATTN_NTHREADS=1")
