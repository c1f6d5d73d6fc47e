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

# `distattn decode` from the command line under mpirun: a verified run over a batch of uneven
# lengths with the JSON record, the two-level tree and the ring; usage errors exit 2.
if(TARGET distattn AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/cli_check.cmake)
  function(da_decode_cli name np rc)
    cmake_parse_arguments(T "" "OUT_RE;ERR_RE;JSON;JSON_RE" "ARGS" ${ARGN})
    set(mpi_args --oversubscribe --bind-to none --timeout 100 -np ${np} $<TARGET_FILE:distattn> decode)
    add_test(NAME ${name}
             COMMAND ${CMAKE_COMMAND} -DEXE=${DA_MPIRUN} "-DARGS=${mpi_args};${T_ARGS}" -DRC=${rc}
                     "-DOUT_RE=${T_OUT_RE}" "-DERR_RE=${T_ERR_RE}" "-DJSON=${T_JSON}" "-DJSON_RE=${T_JSON_RE}"
                     -P ${CMAKE_CURRENT_SOURCE_DIR}/cli_check.cmake)
    set_tests_properties(${name} PROPERTIES LABELS mpi TIMEOUT 130 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endfunction()
  da_decode_cli(cli_decode_tree_np4 4 0 OUT_RE "# wrong: 0.# PASS"
                JSON ${CMAKE_CURRENT_BINARY_DIR}/cli_decode.jsonl
                JSON_RE "\"cmd\":\"decode\",\"algo\":\"tree\".*\"ranks\":4.*\"verify_rows\":6.*\"wrong\":0.*\"peak_rss_bytes\":[0-9]+"
                ARGS --algo tree --context 3000 --heads 4 --kv-heads 1 --dim 64 --batch 3 --lengths 3000,1001,7
                     --steps 3 --verify 6 --page 64 --layout zigzag --json ${CMAKE_CURRENT_BINARY_DIR}/cli_decode.jsonl)
  da_decode_cli(cli_decode_tree2_np5 5 0 OUT_RE "two-level .3 node groups.*# wrong: 0.# PASS"
                ARGS --algo tree --topo two-level --node-size 2 --root 3 --context 2K --heads 8 --kv-heads 2 --dim 32
                     --steps 2 --verify 2 --dtype bf16 --weights 1,2,1,2,1)
  da_decode_cli(cli_decode_ring_np3 3 0 OUT_RE "ring.*# wrong: 0.# PASS"
                ARGS --algo ring --context 1500 --heads 4 --dim 64 --steps 3 --verify 3 --layout striped)
  da_decode_cli(cli_decode_bad_gqa 2 2 ERR_RE "--heads 6 is not a multiple of --kv-heads 4"
                ARGS --context 100 --heads 6 --kv-heads 4 --dim 64)
  da_decode_cli(cli_decode_bad_lengths 2 2 ERR_RE "--lengths '1,2': expected 3 sizes"
                ARGS --context 100 --heads 4 --dim 64 --batch 3 --lengths 1,2)
  da_decode_cli(cli_decode_bad_weights 2 2 ERR_RE "--weights '1': expected 2 positive numbers"
                ARGS --context 100 --heads 4 --dim 64 --weights 1)
  da_decode_cli(cli_decode_bad_root 2 2 ERR_RE "--root 5: the job has 2 ranks"
                ARGS --context 100 --heads 4 --dim 64 --root 5)
  da_decode_cli(cli_decode_missing 1 2 ERR_RE "--context is required" ARGS --heads 4 --dim 64)
endif()
