# library.cmake: the installable library. Bundles the layers (da_core, da_kernels and the CPU ISA
# objects, da_partition, da_comm when MPI was found) into libdistattn.so and libdistattn.a, and
# installs them with include/distattn.h, the `distattn` program, a pkg-config file and a CMake
# package config. Included from the top-level CMakeLists.txt after every layer is defined; the
# layers themselves stay static libraries for the tests and the launcher.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# The layers' object files, in link order (objects, not archives: every symbol lands in the
# library, whether or not a test program happens to reference it).
set(DA_LIB_LAYERS da_core da_kernels da_kernels_cpu da_partition)
foreach(level generic avx2 avx512 avx512bf16 amx avx2bf16emu)
  if(TARGET da_cpu_${level})
    list(APPEND DA_LIB_LAYERS da_cpu_${level})
  endif()
endforeach()
# The CUDA backend's objects when the table is linked into kernels/registry.c (kernels/cuda sets
# DISTATTN_HAVE_CUDA): the library then carries cudart_static (runtime API only, never libcuda).
set(DA_LIB_HAVE_CUDA OFF)
if(TARGET da_cuda AND EXISTS ${PROJECT_SOURCE_DIR}/kernels/cuda/backend.cu)
  list(APPEND DA_LIB_LAYERS da_cuda)
  set(DA_LIB_HAVE_CUDA ON)
endif()
set(DA_LIB_HAVE_MPI OFF)
if(TARGET da_comm)
  list(APPEND DA_LIB_LAYERS da_comm)
  set(DA_LIB_HAVE_MPI ON)
endif()
set(DA_LIB_OBJECTS)
foreach(t IN LISTS DA_LIB_LAYERS)
  if(TARGET ${t})
    list(APPEND DA_LIB_OBJECTS $<TARGET_OBJECTS:${t}>)
  endif()
endforeach()
set(DA_LIB_DEPS OpenMP::OpenMP_C Threads::Threads m)
if(DA_LIB_HAVE_CUDA) # and the C++ runtime the host side of the CUDA objects uses (libdistattn.a users)
  list(APPEND DA_LIB_DEPS CUDA::cudart_static ${CMAKE_DL_LIBS} rt stdc++)
endif()
if(DA_LIB_HAVE_MPI)
  list(APPEND DA_LIB_DEPS MPI::MPI_C)
endif()
# The device transports of comm/ (comm/CMakeLists.txt): the CUDA runtime, statically (never
# libcuda), and libnccl when the nccl transport is built.
get_property(DA_LIB_HAVE_CUDART GLOBAL PROPERTY DA_COMM_HAVE_CUDART)
get_property(DA_LIB_NCCL GLOBAL PROPERTY DA_COMM_NCCL_LIBRARY)
if(NOT DA_LIB_HAVE_MPI)
  set(DA_LIB_HAVE_CUDART OFF)
  set(DA_LIB_NCCL "")
endif()
if(DA_LIB_HAVE_CUDART)
  find_package(CUDAToolkit REQUIRED) # its imported targets are local to the folder that found it
  list(APPEND DA_LIB_DEPS CUDA::cudart_static ${CMAKE_DL_LIBS} rt ${DA_LIB_NCCL})
endif()

# Only the public API is exported: the function names declared in include/distattn.h, listed in
# a linker version script generated from the header at build time (so an added public function
# is exported without editing a list, and internal da_* helpers stay hidden).
set(DA_LIB_MAP ${PROJECT_BINARY_DIR}/distattn.map)
add_custom_command(
  OUTPUT ${DA_LIB_MAP}
  COMMAND ${CMAKE_COMMAND} -DHEADER=${PROJECT_SOURCE_DIR}/include/distattn.h -DOUT=${DA_LIB_MAP}
          -P ${PROJECT_SOURCE_DIR}/cmake/gen_exports.cmake
  DEPENDS ${PROJECT_SOURCE_DIR}/include/distattn.h ${PROJECT_SOURCE_DIR}/cmake/gen_exports.cmake
  COMMENT "distattn: exported symbols from include/distattn.h")
add_custom_target(distattn_exports DEPENDS ${DA_LIB_MAP})

# Target names: `distattn` is the program (launcher/), so the libraries are distattn_shared and
# distattn_static, both with the file name libdistattn, exported as distattn::distattn and
# distattn::distattn_static.
add_library(distattn_shared SHARED ${DA_LIB_OBJECTS})
add_dependencies(distattn_shared distattn_exports)
set_target_properties(distattn_shared PROPERTIES
  OUTPUT_NAME distattn EXPORT_NAME distattn
  VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR}
  LIBRARY_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/lib
  LINK_DEPENDS ${DA_LIB_MAP})
target_link_options(distattn_shared PRIVATE "LINKER:--version-script=${DA_LIB_MAP}")
# clang links the sanitizer runtimes into executables only: an instrumented shared library leaves
# the __asan_* / __ubsan_* symbols for the program to provide, so --no-undefined cannot hold there.
if(NOT DISTATTN_SANITIZE)
  target_link_options(distattn_shared PRIVATE "LINKER:--no-undefined")
endif()
target_link_libraries(distattn_shared PRIVATE da_options ${DA_LIB_DEPS})
target_include_directories(distattn_shared INTERFACE
  $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
if(DA_LIB_HAVE_MPI)
  # Callers of the distributed API include <mpi.h> and pass an MPI_Comm.
  target_link_libraries(distattn_shared INTERFACE MPI::MPI_C)
endif()

add_library(distattn_static STATIC ${DA_LIB_OBJECTS})
set_target_properties(distattn_static PROPERTIES
  OUTPUT_NAME distattn EXPORT_NAME distattn_static
  ARCHIVE_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/lib)
target_link_libraries(distattn_static INTERFACE ${DA_LIB_DEPS})
target_include_directories(distattn_static INTERFACE
  $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)

# ---- install: library, header, program, pkg-config, CMake package ---------------------------
install(TARGETS distattn_shared distattn_static EXPORT distattnTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_SOURCE_DIR}/include/distattn.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
if(TARGET distattn)
  install(TARGETS distattn RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()

# pkg-config: the prefix is written when installing (`cmake --install --prefix X`, which
# `make install PREFIX=X` runs), not when configuring, so any prefix works without
# reconfiguration. MPI comes in through its own module when one exists (Debian: mpi-c, Open MPI:
# ompi-c), else as flags from FindMPI.
set(DA_PC_REQUIRES "")
set(DA_PC_MPI_CFLAGS "")
set(DA_PC_MPI_LIBS "")
if(DA_LIB_HAVE_MPI)
  foreach(m mpi-c ompi-c mpich)
    pkg_check_modules(DA_PC_${m} QUIET ${m})
    if(DA_PC_${m}_FOUND)
      set(DA_PC_REQUIRES "${m}")
      break()
    endif()
  endforeach()
  if(NOT DA_PC_REQUIRES)
    foreach(d IN LISTS MPI_C_INCLUDE_DIRS)
      string(APPEND DA_PC_MPI_CFLAGS " -I${d}")
    endforeach()
    foreach(l IN LISTS MPI_C_LIBRARIES)
      string(APPEND DA_PC_MPI_LIBS " ${l}")
    endforeach()
  endif()
endif()
set(DA_PC_LIBS_PRIVATE "${OpenMP_C_FLAGS} -lpthread -lm")
if(DA_LIB_HAVE_CUDA OR DA_LIB_HAVE_CUDART) # libdistattn.a users link cudart_static (and the C++ runtime the CUDA objects use)
  string(PREPEND DA_PC_LIBS_PRIVATE "-L${CUDAToolkit_LIBRARY_DIR} -lcudart_static -ldl -lrt -lstdc++ ")
endif()
if(DA_LIB_HAVE_CUDART AND DA_LIB_NCCL) # the nccl transport
  string(PREPEND DA_PC_LIBS_PRIVATE "${DA_LIB_NCCL} ")
endif()
set(DA_PC_PREFIX "@DA_PC_PREFIX@") # kept for the install step below
configure_file(${PROJECT_SOURCE_DIR}/distattn.pc.in ${PROJECT_BINARY_DIR}/distattn.pc.in @ONLY)
install(CODE "
  set(DA_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  configure_file(\"${PROJECT_BINARY_DIR}/distattn.pc.in\" \"${PROJECT_BINARY_DIR}/pc/distattn.pc\" @ONLY)
  file(INSTALL \"${PROJECT_BINARY_DIR}/pc/distattn.pc\"
       DESTINATION \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_LIBDIR}/pkgconfig\")")

set(DA_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/distattn)
install(EXPORT distattnTargets NAMESPACE distattn:: DESTINATION ${DA_CMAKE_DIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/distattnConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/distattnConfig.cmake INSTALL_DESTINATION ${DA_CMAKE_DIR}
                              PATH_VARS CMAKE_INSTALL_INCLUDEDIR)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/distattnConfigVersion.cmake
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/distattnConfig.cmake ${PROJECT_BINARY_DIR}/distattnConfigVersion.cmake
        DESTINATION ${DA_CMAKE_DIR})

# The Python wheel (scikit-build-core sets SKBUILD; python/pyproject.toml asks for component
# python only): one copy of the library inside the package, next to _lib.py, which loads it
# first. By path, so the soname links a wheel cannot hold are not needed.
if(SKBUILD)
  install(FILES $<TARGET_FILE:distattn_shared> DESTINATION distattn RENAME libdistattn.so COMPONENT python)
endif()
