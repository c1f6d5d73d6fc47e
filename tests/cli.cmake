# cli.cmake: command-line tests of the `distattn` program (label unit: no MPI). Small verified
# `distattn kernel` runs for every mask and dtype must print `# PASS` and exit 0; malformed input
# must exit with exactly 2 and say why on stderr (a crash fails). Included by tests/CMakeLists.txt.
# Timings printed by these runs are not checked: speed lives in `make bench`.
if(NOT TARGET distattn)
  return()
endif()

set(DA_CLI_CHECK ${CMAKE_CURRENT_SOURCE_DIR}/cli_check.cmake)

# da_cli_test(<name> RC <code> [OUT_RE re] [ERR_RE re] [JSON file JSON_RE re] ARGS <args...>)
function(da_cli_test name)
  cmake_parse_arguments(T "" "RC;OUT_RE;ERR_RE;JSON;JSON_RE" "ARGS" ${ARGN})
  add_test(NAME ${name}
           COMMAND ${CMAKE_COMMAND} -DEXE=$<TARGET_FILE:distattn> "-DARGS=${T_ARGS}" -DRC=${T_RC}
                   "-DOUT_RE=${T_OUT_RE}" "-DERR_RE=${T_ERR_RE}" "-DJSON=${T_JSON}" "-DJSON_RE=${T_JSON_RE}"
                   -P ${DA_CLI_CHECK})
  set_tests_properties(${name} PROPERTIES LABELS unit TIMEOUT 150)
endfunction()

# ---- verified runs: GQA (4 query heads on 2 KV heads), an odd length, every mask and dtype ----
set(da_cli_masks none causal window:37 doc:100,150,50 causal+doc:120,180)
foreach(mask IN LISTS da_cli_masks)
  foreach(dtype fp32 bf16 fp16)
    string(REGEX REPLACE "[^a-zA-Z0-9]+" "_" tag "${mask}")
    da_cli_test(cli_kernel_${tag}_${dtype} RC 0 OUT_RE "# wrong: 0.# PASS"
                ARGS kernel --seq 300 --heads 4 --kv-heads 2 --dim 64 --mask ${mask} --dtype ${dtype}
                     --iters 1 --warmup 0 --verify 24 --decode-q 3 --page 64)
  endforeach()
endforeach()
# Another shape: D = 128, MHA, forms --name=value, several decode pages, the JSON record.
da_cli_test(cli_kernel_json RC 0 OUT_RE "# wrong: 0.# PASS"
            JSON ${CMAKE_CURRENT_BINARY_DIR}/cli_kernel.jsonl
            JSON_RE "\"cmd\":\"kernel\",\"op\":\"fwd\".*\"wrong\":0.*\"peak_rss_bytes\":[0-9]+}.*\"op\":\"decode\""
            ARGS kernel --seq=1K --heads=2 --dim=128 --mask=causal --iters=1 --warmup=0 --verify=8
                 --json ${CMAKE_CURRENT_BINARY_DIR}/cli_kernel.jsonl)
da_cli_test(cli_kernel_help RC 0 OUT_RE "--seq N.K.M.G.*--mask.*default" ARGS kernel --help)

# ---- usage errors: exit exactly 2 with a message naming the problem ----
da_cli_test(cli_bad_flag RC 2 ERR_RE "unknown option '--bogus'" ARGS kernel --bogus 1)
da_cli_test(cli_bad_seq_zero RC 2 ERR_RE "--seq: 0 is out of range" ARGS kernel --seq 0)
da_cli_test(cli_bad_seq_negative RC 2 ERR_RE "--seq: -5 is out of range" ARGS kernel --seq -5)
da_cli_test(cli_bad_seq_suffix RC 2 ERR_RE "--seq: '4X' is not a size" ARGS kernel --seq 4X)
da_cli_test(cli_bad_seq_missing RC 2 ERR_RE "--seq needs a value" ARGS kernel --seq)
da_cli_test(cli_bad_gqa RC 2 ERR_RE "--heads 6 is not a multiple of --kv-heads 4"
            ARGS kernel --heads 6 --kv-heads 4)
da_cli_test(cli_bad_dim RC 2 ERR_RE "--dim: 0 is out of range" ARGS kernel --dim 0)
da_cli_test(cli_bad_mask RC 2 ERR_RE "unknown mask 'bogus'" ARGS kernel --mask bogus)
da_cli_test(cli_bad_mask_doc_sum RC 2 ERR_RE "documents cover 200 tokens but seq = 300"
            ARGS kernel --seq 300 --mask doc:100,100)
da_cli_test(cli_bad_window RC 2 ERR_RE "window" ARGS kernel --mask window:0)
da_cli_test(cli_bad_dtype RC 2 ERR_RE "--dtype: 'fp8' is not one of fp32.bf16.fp16" ARGS kernel --dtype fp8)
da_cli_test(cli_bad_ops RC 2 ERR_RE "--ops: unknown item 'fwdd'" ARGS kernel --ops fwdd)
da_cli_test(cli_bad_positional RC 2 ERR_RE "unexpected argument 'extra'" ARGS kernel extra)
da_cli_test(cli_bad_command RC 2 ERR_RE "unknown command" ARGS frobnicate)
da_cli_test(cli_bad_json_path RC 2 ERR_RE "cannot open --json" ARGS kernel --seq 64 --json /nonexistent-dir/x.jsonl)
