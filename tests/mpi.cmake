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

# The same ring driver in device mode (`test_ring device`): buffers and tensors in the host seam's
# memory (devapi.h), transport host-ipc, the CPU kernels; delayed, poisoning copies; planted
# ordering mistakes must be caught (docs/ring.md, "Device mode"). test_ring_dev_mpi: the same suite
# over host-mpi, the mpi transport staging every message through pinned host buffers
# (comm/staged.c), with its own planted mistakes (DISTATTN_TEST_STAGE_SKIP=d2h|h2d).
foreach(P 1 2 3 4 5 8)
  add_test(NAME test_ring_dev_np${P}
           COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 200 -np ${P} $<TARGET_FILE:test_ring> device)
  set_tests_properties(test_ring_dev_np${P} PROPERTIES LABELS mpi TIMEOUT 230 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  add_test(NAME test_ring_dev_mpi_np${P}
           COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 200 -np ${P} $<TARGET_FILE:test_ring> device
                   host-mpi)
  set_tests_properties(test_ring_dev_mpi_np${P} PROPERTIES LABELS mpi TIMEOUT 230 ENVIRONMENT "${DA_MPI_TEST_ENV}")
endforeach()

# The Ulysses driver (all-to-all), tests/test_ulysses.c: P divides its 24 heads.
add_executable(test_ulysses test_ulysses.c)
target_link_libraries(test_ulysses PRIVATE da_comm da_ref da_core Check::check MPI::MPI_C m)
foreach(P 1 2 3 4 6 8)
  add_test(NAME test_ulysses_np${P}
           COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 300 -np ${P} $<TARGET_FILE:test_ulysses>)
  set_tests_properties(test_ulysses_np${P} PROPERTIES LABELS mpi TIMEOUT 330 ENVIRONMENT "${DA_MPI_TEST_ENV}")
endforeach()

# The hybrid Ulysses x ring driver, tests/test_hybrid.c: degrees 2x1, 1x2, 3x1, 1x3, 2x2, 2x3, 3x2, 4x2.
add_executable(test_hybrid test_hybrid.c)
target_link_libraries(test_hybrid PRIVATE da_comm da_ref da_core Check::check MPI::MPI_C m)
foreach(P 1 2 3 4 6 8)
  add_test(NAME test_hybrid_np${P}
           COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 300 -np ${P} $<TARGET_FILE:test_hybrid>)
  set_tests_properties(test_hybrid_np${P} PROPERTIES LABELS mpi TIMEOUT 330 ENVIRONMENT "${DA_MPI_TEST_ENV}")
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
    cmake_parse_arguments(T "" "OUT_RE;ERR_RE;JSON;JSON_RE" "ARGS;ENV" ${ARGN})
    set(mpi_args --oversubscribe --bind-to none --timeout 100)
    foreach(kv IN LISTS T_ENV)
      list(APPEND mpi_args -x ${kv})
    endforeach()
    list(APPEND mpi_args -np ${np} $<TARGET_FILE:distattn> decode)
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
  # A NaN key in the cache and an infinite value of a new token: flagged, verified rows counted apart.
  da_decode_cli(cli_decode_nonfinite_tree 3 0 ENV DISTATTN_TEST_NONFINITE=k:100,v:1502:inf OUT_RE "non-finite values .NaN or Inf, all ranks.: k 1, v 1, out [0-9]+;.*warning: [0-9]+ verified .row, head. vectors have a non-finite.*# wrong: 0.# PASS"
                JSON ${CMAKE_CURRENT_BINARY_DIR}/cli_decode_nonfinite.jsonl
                JSON_RE "\"verify_rows\":3,.*\"wrong\":0,.*\"nonfinite_rows\":[1-9][0-9]*,\"nonfinite_inputs\":2,\"nonfinite_outputs\":[1-9][0-9]*,\"nonfinite_wrong\":0"
                ARGS --algo tree --context 1500 --heads 4 --kv-heads 2 --dim 64 --steps 3 --verify 3
                     --json ${CMAKE_CURRENT_BINARY_DIR}/cli_decode_nonfinite.jsonl)
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

# `distattn run` from the command line under mpirun (issue 3): verified runs of every algorithm
# on lengths P does not divide, the JSON record with every field of design §5, --measure-overlap
# under the test-only slow link; bad input exits 2 on every rank with one message, ranks given
# different problems (an MPMD launch) all exit 2 naming the disagreement, never hang.
if(TARGET distattn AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/cli_check.cmake)
  # da_run_cli(<name> <np> <rc> [ENV k=v;..] [OUT_RE re] [ERR_RE re] [JSON file JSON_RE re] ARGS ..)
  # ARGS follow `distattn run`; RAW_ARGS replace the whole mpirun tail (MPMD launches).
  function(da_run_cli name np rc)
    cmake_parse_arguments(T "" "OUT_RE;ERR_RE;JSON;JSON_RE" "ARGS;RAW_ARGS;ENV" ${ARGN})
    set(mpi_args --oversubscribe --bind-to none --timeout 100)
    foreach(kv IN LISTS T_ENV)
      list(APPEND mpi_args -x ${kv})
    endforeach()
    if(T_RAW_ARGS)
      list(APPEND mpi_args ${T_RAW_ARGS})
    else()
      list(APPEND mpi_args -np ${np} $<TARGET_FILE:distattn> run ${T_ARGS})
    endif()
    add_test(NAME ${name}
             COMMAND ${CMAKE_COMMAND} -DEXE=${DA_MPIRUN} "-DARGS=${mpi_args}" -DRC=${rc}
                     "-DOUT_RE=${T_OUT_RE}" "-DERR_RE=${T_ERR_RE}" "-DJSON=${T_JSON}" "-DJSON_RE=${T_JSON_RE}"
                     -P ${CMAKE_CURRENT_SOURCE_DIR}/cli_check.cmake)
    set_tests_properties(${name} PROPERTIES LABELS mpi TIMEOUT 130 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endfunction()

  set(run_json ${CMAKE_CURRENT_BINARY_DIR}/cli_run.jsonl)
  set(num "-?[0-9][0-9.e+-]*")
  # Every field of design §5 in one record, in order (SLURM_JOB_ID passed in to see it recorded).
  set(run_json_re "\"cmd\":\"run\",\"algo\":\"zigzag\",\"ranks\":4,\"seq\":1003,\"batch\":2,\"heads\":4,\"kv_heads\":1,\"dim\":64,\"mask\":\"causal\",\"dtype\":\"bf16\",\"device\":\"cpu\",")
  string(APPEND run_json_re ".*\"fwd_s\":${num},\"bwd_s\":${num},\"gflops\":${num},.*\"verify_rows\":16,\"max_abs_err\":${num},\"max_rel_err\":${num},\"wrong\":0,")
  string(APPEND run_json_re "\"comm_bytes\":${num},\"comm_exposed_s\":${num},\"overlap\":${num},.*\"imbalance\":${num},\"imbalance_work\":${num},")
  string(APPEND run_json_re ".*\"link_gbps\":0.05,\"link_us\":200,\"peak_rss_bytes\":[0-9]+,\"hosts\":\"[^\"]+\",\"git\":\"[^\"]+\",\"SLURM_JOB_ID\":\"4242\"")
  da_run_cli(cli_run_zigzag_np4 4 0 ENV DISTATTN_TEST_LINK_GBPS=0.05 DISTATTN_TEST_LINK_US=200 SLURM_JOB_ID=4242
             OUT_RE "test link hook: DISTATTN_TEST_LINK_GBPS=0.05.*imb_work.*# wrong: 0.# PASS"
             JSON ${run_json} JSON_RE "${run_json_re}"
             ARGS --algo zigzag --seq 1003 --batch 2 --heads 4 --kv-heads 1 --dim 64 --mask causal --dtype bf16
                  --backward --verify 4 --iters 1 --warmup 0 --measure-overlap --json ${run_json})
  da_run_cli(cli_run_ring_np3 3 0 OUT_RE "ring +3 +1001 .*window:100.*# wrong: 0.# PASS"
             ARGS --algo ring --seq 1001 --heads 4 --kv-heads 2 --dim 32 --mask window:100 --backward
                  --verify 6 --iters 1 --warmup 0 --block 64)
  da_run_cli(cli_run_striped_np5 5 0 OUT_RE "striped +5 +1004 .*# wrong: 0.# PASS"
             ARGS --algo striped --seq 1004 --heads 2 --dim 128 --mask causal+doc:300,400,304 --dtype fp16
                  --backward --verify 4 --iters 1 --warmup 0)
  # Ulysses (issue 20): GQA with the KV heads replicated (G = 2 < P = 4), causal, backward; a
  # head count P does not divide is refused on every rank (exit 2).
  da_run_cli(cli_run_ulysses_np4 4 0 OUT_RE "layout: ulysses.*ulysses +4 +1003 .*# wrong: 0.# PASS"
             ARGS --algo ulysses --seq 1003 --heads 8 --kv-heads 2 --dim 64 --mask causal --backward
                  --verify 16 --iters 1 --warmup 0)
  da_run_cli(cli_run_ulysses_bad_heads 4 2 ERR_RE "ulysses: 6 heads cannot be split over 4 ranks"
             ARGS --algo ulysses --seq 256 --heads 6 --kv-heads 2 --dim 64 --verify 4 --iters 1 --warmup 0)
  # Hybrid (issue 20): the acceptance command's shape at 1003 tokens (ulysses 4 x ring 2 on
  # zigzag, KV heads replicated: G = 2 < U = 4), its record naming the degrees and the exposed
  # all-to-all time; the same with the KV heads split (G = U = 2, 2 x 2 on striped); a degree that
  # does not divide the ranks, and heads it does not divide, refused on every rank (exit 2).
  set(hy_json ${CMAKE_CURRENT_BINARY_DIR}/cli_run_hybrid.jsonl)
  da_run_cli(cli_run_hybrid_np8 8 0
             OUT_RE "layout: hybrid \\(ulysses 4 x ring 2 on zigzag\\).*hybrid +8 +1003 .*# wrong: 0.# PASS"
             JSON ${hy_json}
             JSON_RE "\"algo\":\"hybrid\",\"ranks\":8,.*\"ulysses\":4,\"ring\":2,\"ring_layout\":\"zigzag\",.*\"wrong\":0,\"comm_bytes\":${num},\"comm_exposed_s\":${num},"
             ARGS --algo hybrid --ulysses 4 --seq 1003 --heads 8 --kv-heads 2 --dim 64 --mask causal --backward
                  --verify 16 --iters 1 --warmup 0 --json ${hy_json})
  da_run_cli(cli_run_hybrid_np4 4 0 OUT_RE "layout: hybrid \\(ulysses 2 x ring 2 on striped\\).*# wrong: 0.# PASS"
             ARGS --algo hybrid --ulysses 2 --layout striped --seq 777 --heads 4 --kv-heads 2 --dim 32
                  --mask window:100 --dtype bf16 --backward --verify 8 --iters 1 --warmup 0)
  da_run_cli(cli_run_hybrid_bad_degree 4 2 ERR_RE "hybrid: ulysses degree 3 does not divide 4 ranks"
             ARGS --algo hybrid --ulysses 3 --seq 256 --heads 6 --dim 16 --verify 4 --iters 1 --warmup 0)
  da_run_cli(cli_run_hybrid_bad_heads 4 2 ERR_RE "hybrid: 6 heads cannot be split over ulysses degree 4"
             ARGS --algo hybrid --ulysses 4 --seq 256 --heads 6 --dim 16 --verify 4 --iters 1 --warmup 0)
  da_run_cli(cli_run_np1 1 0 OUT_RE "zigzag +1 +777 .*# wrong: 0.# PASS"
             ARGS --seq 777 --heads 3 --dim 64 --verify 5 --iters 1 --warmup 0)

  # NaN / Inf inputs (DISTATTN_TEST_NONFINITE, a testing aid): flagged in the report and the
  # record, never a crash; rows whose float64 reference is non-finite are counted apart, the
  # finite rows are still verified (every local row here: --verify 100 at 100 rows per rank).
  set(nf_json ${CMAKE_CURRENT_BINARY_DIR}/cli_run_nonfinite.jsonl)
  da_run_cli(cli_run_nonfinite_q 3 0 ENV DISTATTN_TEST_NONFINITE=q:17
             OUT_RE "warning: non-finite values .NaN or Inf, all ranks.: q 1, out 32;.*warning: 1 verified .row, head. vectors have a non-finite float64 reference.*# wrong: 0.# PASS"
             JSON ${nf_json} JSON_RE "\"verify_rows\":300,.*\"wrong\":0,.*\"nonfinite_rows\":1,\"nonfinite_inputs\":1,\"nonfinite_outputs\":32,\"nonfinite_wrong\":0"
             ARGS --algo zigzag --seq 300 --heads 4 --kv-heads 2 --dim 32 --mask causal --verify 100 --iters 1 --warmup 0
                  --json ${nf_json})
  da_run_cli(cli_run_nonfinite_kv 3 0 ENV DISTATTN_TEST_NONFINITE=k:250:inf,v:10
             OUT_RE "non-finite values .NaN or Inf, all ranks.: k 1, v 1, out [0-9]+, dq [0-9]+, dk [0-9]+, dv [0-9]+;.*warning: 1800 verified .row, head. vectors.*# wrong: 0.# PASS"
             ARGS --algo ring --seq 300 --heads 4 --kv-heads 2 --dim 32 --verify 100 --iters 1 --warmup 0 --backward)
  # Under a causal mask the backward spreads a NaN query to keys the mask hides from it (0 x NaN
  # in a shared tile, docs/decisions.md): those vectors are wrong, and the report says why.
  da_run_cli(cli_run_nonfinite_masked 3 1 ENV DISTATTN_TEST_NONFINITE=q:17
             OUT_RE "warning: [0-9]+ of the wrong .row, head. vectors are non-finite where the float64 reference is finite: a non-finite input reaches rows the mask hides.*# FAIL"
             ARGS --algo zigzag --seq 300 --heads 4 --kv-heads 2 --dim 32 --mask causal --verify 100 --iters 1 --warmup 0
                  --backward)
  da_run_cli(cli_run_bad_nonfinite 2 2 ENV DISTATTN_TEST_NONFINITE=x:1 ERR_RE "DISTATTN_TEST_NONFINITE=x:1: expected"
             ARGS --seq 64 --heads 2 --dim 16)

  # Usage errors: exit 2 on every rank, one message, nothing run.
  da_run_cli(cli_run_bad_flag 3 2 ERR_RE "unknown option '--bogus'" ARGS --seq 64 --heads 2 --dim 16 --bogus 1)
  da_run_cli(cli_run_bad_seq 3 2 ERR_RE "--seq: 0 is out of range" ARGS --seq 0 --heads 2 --dim 16)
  da_run_cli(cli_run_bad_size 3 2 ERR_RE "--seq: '4X' is not a size" ARGS --seq 4X --heads 2 --dim 16)
  da_run_cli(cli_run_missing 3 2 ERR_RE "--dim is required" ARGS --seq 64 --heads 2)
  da_run_cli(cli_run_bad_gqa 3 2 ERR_RE "--heads 6 is not a multiple of --kv-heads 4"
             ARGS --seq 64 --heads 6 --kv-heads 4 --dim 16)
  da_run_cli(cli_run_bad_algo 3 2 ERR_RE "--algo: 'spiral' is not one of ring.striped.zigzag"
             ARGS --algo spiral --seq 64 --heads 2 --dim 16)
  da_run_cli(cli_run_bad_mask 3 2 ERR_RE "documents cover 200 tokens but seq = 300"
             ARGS --seq 300 --heads 2 --dim 16 --mask doc:100,100)
  da_run_cli(cli_run_bad_dim 3 2 ERR_RE "head dim 1000"
             ARGS --seq 64 --heads 2 --dim 1000)
  da_run_cli(cli_run_bad_json 3 2 ERR_RE "cannot open --json /nonexistent-dir/x.jsonl"
             ARGS --seq 64 --heads 2 --dim 16 --json /nonexistent-dir/x.jsonl)
  da_run_cli(cli_run_bad_link 2 2 ENV DISTATTN_TEST_LINK_GBPS=fast ERR_RE "DISTATTN_TEST_LINK_GBPS=fast"
             ARGS --seq 64 --heads 2 --dim 16)
  # Ranks given different arguments (MPMD): a different problem is a mismatch on every rank; a
  # bad flag on rank 1 only is still one message (from rank 1) and exit 2 everywhere.
  set(exe $<TARGET_FILE:distattn>)
  da_run_cli(cli_run_mismatch 3 2 ERR_RE "ranks disagree on --seq: 100 on rank 0; 101 on ranks 1-2"
             RAW_ARGS -np 1 ${exe} run --seq 100 --heads 2 --dim 16 : -np 2 ${exe} run --seq 101 --heads 2 --dim 16)
  # The verifier's scale on tiny problems (issue 19, class 6): with one key per query (seq 1,
  # window:1, one-token documents) dq and dk are exactly 0 and both the kernel's result and the
  # float64 reference are rounding noise; they pass against the row's rounding noise
  # (da_verify_den), at P = 1..3. Planted errors: 1e-6 on the all-zero dk of seq 1 is caught, a
  # noise-sized 1e-8 is not; on a normal problem 3e-5 (1e-4 of |dk|) is caught as before.
  foreach(P 1 2 3)
    foreach(tiny "1" "2" "3;--mask;causal" "5;--mask;window:1" "3;--mask;doc:1,1,1")
      list(GET tiny 0 S)
      string(REGEX REPLACE "[^a-z0-9]+" "_" tag "${tiny}")
      da_run_cli(cli_run_tiny_${tag}_np${P} ${P} 0 OUT_RE "# wrong: 0.# PASS"
                 ARGS --seq ${tiny} --heads 2 --kv-heads 1 --dim 16 --backward --iters 1 --warmup 0)
    endforeach()
  endforeach()
  da_run_cli(cli_run_plant_zero_caught 2 1 ENV DISTATTN_TEST_PLANT=dk:1e-6 OUT_RE "# wrong: [1-9][0-9]*.# FAIL"
             ARGS --seq 1 --heads 2 --dim 16 --backward --iters 1 --warmup 0)
  da_run_cli(cli_run_plant_zero_noise 2 0 ENV DISTATTN_TEST_PLANT=dk:1e-8 OUT_RE "# wrong: 0.# PASS"
             ARGS --seq 1 --heads 2 --dim 16 --backward --iters 1 --warmup 0)
  da_run_cli(cli_run_plant_normal_caught 3 1 ENV DISTATTN_TEST_PLANT=dk:3e-5 OUT_RE "# wrong: [1-9][0-9]*.# FAIL"
             ARGS --seq 300 --mask causal --heads 2 --dim 16 --backward --iters 1 --warmup 0)
  da_run_cli(cli_run_mismatch_flag 2 2 ERR_RE "rank 1 was given other arguments than rank 0.*unknown option '--sq'"
             RAW_ARGS -np 1 ${exe} run --seq 100 --heads 2 --dim 16 : -np 1 ${exe} run --sq 100 --heads 2 --dim 16)
endif()

# Plan creation when something is wrong (issue 10), tests/test_setup.c: the memory check of
# da_plan_create (label mpi); a rank that never calls a setup function (label fault, with the
# kill / stop tests of tests/fault.cmake; each case waits out a 2 s deadline and a 2 s roll call).
if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_setup.c)
  add_executable(test_setup test_setup.c)
  target_link_libraries(test_setup PRIVATE da_comm da_core Check::check MPI::MPI_C m)
  foreach(P 2 3)
    add_test(NAME test_setup_mem_np${P}
             COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 120 -np ${P} $<TARGET_FILE:test_setup> mem)
    set_tests_properties(test_setup_mem_np${P} PROPERTIES LABELS mpi TIMEOUT 150 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endforeach()
  add_test(NAME test_setup_deadline_np3
           COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 90 -np 3 $<TARGET_FILE:test_setup> deadline)
  set_tests_properties(test_setup_deadline_np3 PROPERTIES LABELS fault TIMEOUT 100 SKIP_RETURN_CODE 77
                       ENVIRONMENT "${DA_MPI_TEST_ENV}")
endif()

# Attention offloading to memory ranks (issue 5), tests/test_offload.c: role splits 1 compute +
# 1..4 memory and 2 + 3 on sub-communicators of the job, role errors and the budget refusal.
if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_offload.c)
  add_executable(test_offload test_offload.c)
  target_link_libraries(test_offload PRIVATE da_comm da_ref da_core Check::check MPI::MPI_C m)
  foreach(P 2 3 5)
    add_test(NAME test_offload_np${P}
             COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 120 -np ${P} $<TARGET_FILE:test_offload>)
    set_tests_properties(test_offload_np${P} PROPERTIES LABELS mpi TIMEOUT 150 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endforeach()
endif()

# The offload API through the public header and the shared library only (tests/test_offload_api.c):
# role splits against a local tree decode and float64, cancel, a bad tensor, the deadline.
if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_offload_api.c AND TARGET distattn_shared)
  add_executable(test_offload_api test_offload_api.c)
  target_link_libraries(test_offload_api PRIVATE distattn_shared da_options Check::check MPI::MPI_C m)
  foreach(P 2 5)
    add_test(NAME test_offload_api_np${P}
             COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 120 -np ${P} $<TARGET_FILE:test_offload_api>)
    set_tests_properties(test_offload_api_np${P} PROPERTIES LABELS mpi TIMEOUT 150 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endforeach()
endif()

# `distattn decode --offload` (issue 5): an MPMD launch, one component per role; role errors and
# the budget refusal exit 2 with a clear message.
if(TARGET distattn AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/cli_check.cmake AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_offload.c)
  function(da_offload_cli name rc)
    cmake_parse_arguments(T "" "OUT_RE;ERR_RE" "RAW_ARGS" ${ARGN})
    set(mpi_args --oversubscribe --bind-to none --timeout 100 ${T_RAW_ARGS})
    add_test(NAME ${name}
             COMMAND ${CMAKE_COMMAND} -DEXE=${DA_MPIRUN} "-DARGS=${mpi_args}" -DRC=${rc}
                     "-DOUT_RE=${T_OUT_RE}" "-DERR_RE=${T_ERR_RE}" -DJSON= -DJSON_RE= -P ${CMAKE_CURRENT_SOURCE_DIR}/cli_check.cmake)
    set_tests_properties(${name} PROPERTIES LABELS mpi TIMEOUT 130 ENVIRONMENT "${DA_MPI_TEST_ENV}")
  endfunction()
  set(exe $<TARGET_FILE:distattn>)
  set(oa --context 3000 --heads 4 --kv-heads 2 --dim 64 --batch 3 --layers 2 --microbatches 2 --layer-compute 0.2
         --steps 3 --verify 6 --page 64 --baseline)
  da_offload_cli(cli_offload_1c3m 0 OUT_RE "1\\+3 .*# wrong: 0.# PASS"
                 RAW_ARGS -np 1 ${exe} decode --offload --role compute ${oa} : -np 3 ${exe} decode --offload --role memory --mem-budget 64M ${oa})
  da_offload_cli(cli_offload_missing_role 2 ERR_RE "rank 1 has no role"
                 RAW_ARGS -np 1 ${exe} decode --offload --role compute ${oa} : -np 1 ${exe} decode --offload ${oa})
  da_offload_cli(cli_offload_no_memory 2 ERR_RE "needs at least one memory rank"
                 RAW_ARGS -np 2 ${exe} decode --offload --role compute ${oa} : -np 1 ${exe} decode --offload --role memory ${oa})
  da_offload_cli(cli_offload_over_budget 2 ERR_RE "memory rank 1 would hold .* over its budget of 0.1 MiB"
                 RAW_ARGS -np 1 ${exe} decode --offload --role compute ${oa} : -np 1 ${exe} decode --offload --role memory --mem-budget 100K ${oa})
  da_offload_cli(cli_decode_over_budget 2 ERR_RE "over --mem-budget 1.0 MiB: offload it to memory ranks"
                 RAW_ARGS -np 2 ${exe} decode --context 64K --heads 4 --dim 64 --mem-budget 1M)
endif()

# Misuse of the library (issue 19, class 1), tests/test_misuse.c: every public function of
# include/distattn.h with NULL or invalid arguments returns a status and a message, never a crash;
# the function list is read from the header, so a new function without a case fails the test.
# P = 2: the intercommunicator case needs two groups.
add_executable(test_misuse test_misuse.c)
target_link_libraries(test_misuse PRIVATE da_comm da_core MPI::MPI_C m)
target_compile_definitions(test_misuse PRIVATE DA_HEADER_PATH="${PROJECT_SOURCE_DIR}/include/distattn.h")
add_test(NAME test_misuse_np2
         COMMAND ${DA_MPIRUN} --oversubscribe --bind-to none --timeout 120 -np 2 $<TARGET_FILE:test_misuse>)
set_tests_properties(test_misuse_np2 PROPERTIES LABELS mpi TIMEOUT 150 ENVIRONMENT "${DA_MPI_TEST_ENV}")

# --json under adverse conditions (issue 19, class 7): a file locked by another process is named
# as such within the deadline (not as a missing rank); bytes that are not UTF-8 never make an
# invalid JSON line.
foreach(case locked utf8)
  add_test(NAME cli_json_${case} COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/json_faults_test.sh $<TARGET_FILE:distattn>
                                         ${DA_MPIRUN} ${case})
  set_tests_properties(cli_json_${case} PROPERTIES LABELS mpi TIMEOUT 90 PASS_REGULAR_EXPRESSION "PASS ${case}"
                       ENVIRONMENT "${DA_MPI_TEST_ENV}")
endforeach()
# A deadline too short to mean anything is refused when parsed (issue 19, class 7): it used to run
# and report ranks as "never reached da_plan_create". The thread count is bounded likewise.
if(COMMAND da_run_cli)
  da_run_cli(cli_run_timeout_floor 2 2 ERR_RE "--timeout: 1e-9 is below 1, the smallest value accepted"
             ARGS --seq 64 --heads 2 --dim 16 --timeout 1e-9)
  da_run_cli(cli_run_threads_bound 1 2 ERR_RE "--threads: 100000 is out of range \\[0, 1024\\]"
             ARGS --seq 64 --heads 2 --dim 16 --threads 100000)
endif()
