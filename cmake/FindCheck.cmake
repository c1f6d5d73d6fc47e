# FindCheck.cmake: the Check unit-test framework through pkg-config (Check 0.15 ships no CMake
# package). Defines Check_FOUND, Check_VERSION and the imported target Check::check.
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(PC_CHECK QUIET IMPORTED_TARGET check)
endif()
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(Check REQUIRED_VARS PC_CHECK_FOUND VERSION_VAR PC_CHECK_VERSION)
if(Check_FOUND AND NOT TARGET Check::check)
  add_library(Check::check INTERFACE IMPORTED)
  target_link_libraries(Check::check INTERFACE PkgConfig::PC_CHECK)
  set(Check_VERSION ${PC_CHECK_VERSION})
endif()
