# Label sim: the SimGrid SMPI build of the drivers (sim/) against the closed-form model of
# `distattn plan`, and the plan command line. Exit 77 (skipped) only without smpicc/smpirun.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_FOUND)
  add_test(NAME sim_model COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/sim/sweep.py --check
           --build ${PROJECT_BINARY_DIR})
  set_tests_properties(sim_model PROPERTIES LABELS sim SKIP_RETURN_CODE 77 TIMEOUT 300)
endif()
add_test(NAME plan_cli COMMAND ${CMAKE_COMMAND} -DEXE=$<TARGET_FILE:distattn> -DOUT=${CMAKE_CURRENT_BINARY_DIR}/plan_cli
         -P ${CMAKE_CURRENT_SOURCE_DIR}/plan_cli.cmake)
set_tests_properties(plan_cli PROPERTIES LABELS sim TIMEOUT 60)
