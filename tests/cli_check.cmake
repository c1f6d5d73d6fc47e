# cli_check.cmake: run one `distattn` command line and check how it ended, for tests/cli.cmake.
# cmake -DEXE=... -DARGS="a;b;c" -DRC=<expected exit code> [-DOUT_RE=regex] [-DERR_RE=regex]
#       [-DJSON=file -DJSON_RE=regex] -P cli_check.cmake
# A crash is never the expected code: execute_process reports it as a string ("Segmentation
# fault"), which differs from every number, so a crashing command fails the test.
if(JSON)
  file(REMOVE "${JSON}")
endif()
execute_process(COMMAND "${EXE}" ${ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                TIMEOUT 120)
string(REPLACE ";" " " shown "${ARGS}")
if(NOT "${rc}" STREQUAL "${RC}")
  message(FATAL_ERROR "distattn ${shown}: exit '${rc}', expected ${RC}\nstdout:\n${out}\nstderr:\n${err}")
endif()
if(OUT_RE AND NOT out MATCHES "${OUT_RE}")
  message(FATAL_ERROR "distattn ${shown}: stdout does not match '${OUT_RE}'\nstdout:\n${out}\nstderr:\n${err}")
endif()
if(ERR_RE AND NOT err MATCHES "${ERR_RE}")
  message(FATAL_ERROR "distattn ${shown}: stderr does not match '${ERR_RE}'\nstderr:\n${err}")
endif()
if(RC STREQUAL "2" AND out MATCHES "# (PASS|FAIL)")
  message(FATAL_ERROR "distattn ${shown}: a usage error must not print results\nstdout:\n${out}")
endif()
if(JSON)
  file(READ "${JSON}" js)
  if(NOT js MATCHES "${JSON_RE}")
    message(FATAL_ERROR "distattn ${shown}: ${JSON} does not match '${JSON_RE}':\n${js}")
  endif()
endif()
message(STATUS "distattn ${shown}: exit ${rc} as expected")
