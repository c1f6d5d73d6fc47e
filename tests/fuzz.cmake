# fuzz.cmake: libFuzzer targets (label fuzz, issue 10) for the option / size parser
# (fuzz_args.c, launcher/args.c + da_parse_size), the --mask spec parser with the mask
# functions behind it (fuzz_mask.c, core/mask.c) and the .npy header parser (fuzz_npy.c, core/npy.c). Configure a clang build with
# -DDISTATTN_FUZZ=ON (scripts/check-sanitize.sh does, with DISTATTN_SANITIZE=ON); each test is a
# bounded run of DISTATTN_FUZZ_SECONDS (20) from the seed corpora in tests/fuzz/corpus.
# fuzz_npy.c: the .npy header parser of core/npy.c (what --input reads before anything else).
option(DISTATTN_FUZZ "Build the libFuzzer targets (clang only)" OFF)
if(NOT DISTATTN_FUZZ)
  # The normal (gcc) build drives the clang one: label fuzz (part of the default `make test`,
  # about 50 s with the build) and label sanitize (opt-in: `make check-sanitize`, excluded from
  # the default `make test`; ASan + UBSan unit and MPI tests, then valgrind memcheck). Both
  # configure ${PROJECT_BINARY_DIR}/asan with scripts/check-sanitize.sh.
  find_program(DA_CLANG NAMES clang)
  if(DA_CLANG)
    foreach(kind fuzz sanitize)
      set(mode ${kind})
      if(kind STREQUAL "sanitize")
        set(mode all)
      endif()
      add_test(NAME ${kind}_clang COMMAND ${CMAKE_COMMAND} -E env BUILD_ASAN=${PROJECT_BINARY_DIR}/asan
                                          BUILD_VALGRIND=${PROJECT_BINARY_DIR}/valgrind
                                          ${PROJECT_SOURCE_DIR}/scripts/check-sanitize.sh ${mode})
      set_tests_properties(${kind}_clang PROPERTIES LABELS ${kind} TIMEOUT 1800 RESOURCE_LOCK distattn_asan)
    endforeach()
  endif()
  return()
endif()
if(NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
  message(FATAL_ERROR "DISTATTN_FUZZ=ON needs clang (CC=clang): libFuzzer is part of clang")
endif()
set(DISTATTN_FUZZ_SECONDS 20 CACHE STRING "Seconds per bounded fuzz run (label fuzz)")
set(fz ${CMAKE_CURRENT_SOURCE_DIR}/fuzz)
# The parsers are compiled into each target so that they carry the coverage instrumentation.
set(fuzz_args_src ${fz}/fuzz_args.c ${PROJECT_SOURCE_DIR}/launcher/args.c ${PROJECT_SOURCE_DIR}/core/mask.c)
set(fuzz_mask_src ${fz}/fuzz_mask.c ${PROJECT_SOURCE_DIR}/launcher/args.c ${PROJECT_SOURCE_DIR}/core/mask.c)
set(fuzz_npy_src ${fz}/fuzz_npy.c ${PROJECT_SOURCE_DIR}/core/npy.c)
foreach(t fuzz_args fuzz_mask fuzz_npy)
  add_executable(${t} ${${t}_src})
  target_include_directories(${t} PRIVATE ${PROJECT_SOURCE_DIR}/launcher)
  target_compile_options(${t} PRIVATE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
                                      -fno-omit-frame-pointer -g)
  target_link_options(${t} PRIVATE -fsanitize=fuzzer,address,undefined)
  target_link_libraries(${t} PRIVATE da_core)
  string(REPLACE "fuzz_" "" corpus ${t})
  add_test(NAME ${t}_run
           COMMAND ${fz}/run_fuzz.sh $<TARGET_FILE:${t}> ${DISTATTN_FUZZ_SECONDS} ${fz}/corpus/${corpus}
                   ${CMAKE_CURRENT_BINARY_DIR}/fuzz-${corpus})
  set_tests_properties(${t}_run PROPERTIES LABELS fuzz TIMEOUT 120)
endforeach()
