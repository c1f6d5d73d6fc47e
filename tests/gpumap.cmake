# gpumap.cmake: `--device cuda` and the rank -> GPU map under mpirun (label mpi), included by
# tests/CMakeLists.txt after mpi.cmake (da_run_cli). Without a GPU (here, CI):
#  - `run|decode --device cuda` stops on every rank with exit 2 and one message naming CUDA, at
#    -np 1 and 3 (no CUDA in the build: "this build has no CUDA runtime"; CUDA built but no
#    driver or GPU: the runtime's own error; both say CUDA);
#  - the map itself, on pretend GPUs (DISTATTN_TEST_GPUS=N, the host seam: CPU kernels): sharing
#    when ranks outnumber GPUs (said in the header), --ranks-per-gpu blocks, its refusals, the
#    nccl refusal of a shared GPU, and the "gpu_map" array of the JSON record.
if(NOT TARGET distattn OR NOT COMMAND da_run_cli)
  return()
endif()
set(g_args --algo ring --seq 300 --heads 2 --dim 16 --verify 4 --iters 1 --warmup 0)
da_run_cli(cli_ranks_per_gpu_needs_cuda 1 2 ERR_RE "--ranks-per-gpu needs --device cuda"
           ARGS ${g_args} --ranks-per-gpu 2)
da_run_cli(cli_offload_device_cuda 2 2 ERR_RE "--device cuda: the offloaded attention stays host-side"
           RAW_ARGS -np 2 $<TARGET_FILE:distattn> decode --offload --role compute --context 100 --heads 2 --dim 16
                    --device cuda)
# A build without the CUDA backend (DISTATTN_CUDA=OFF, or no nvcc; the sanitizer build) refuses
# --device cuda before anything, pretend GPUs or not; the map's tests need the backend.
if(NOT (TARGET da_cuda AND EXISTS ${PROJECT_SOURCE_DIR}/kernels/cuda/backend.cu))
  da_run_cli(cli_run_device_cuda_not_built 1 2 ENV DISTATTN_TEST_GPUS=1
             ERR_RE "distattn run: --device cuda: the CUDA backend is not built in" ARGS ${g_args} --device cuda)
  da_run_cli(cli_decode_device_cuda_not_built 1 2 ENV DISTATTN_TEST_GPUS=1
             ERR_RE "distattn decode: --device cuda: the CUDA backend is not built in"
             RAW_ARGS -np 1 $<TARGET_FILE:distattn> decode --context 200 --heads 2 --dim 16 --steps 1 --device cuda)
  return()
endif()
foreach(P 1 3)
  da_run_cli(cli_device_cuda_nogpu_np${P} ${P} 2
             ERR_RE "distattn run: --device cuda: rank 0 \\(host [^)]*\\): CUDA: .*every rank stops \\(exit 2\\)"
             ARGS ${g_args} --device cuda)
  da_run_cli(cli_decode_device_cuda_nogpu_np${P} ${P} 2
             ERR_RE "distattn decode: --device cuda: rank 0 \\(host [^)]*\\): CUDA: .*every rank stops \\(exit 2\\)"
             RAW_ARGS -np ${P} $<TARGET_FILE:distattn> decode --context 200 --heads 2 --dim 16 --steps 1 --device cuda)
endforeach()
set(gm_json ${CMAKE_CURRENT_BINARY_DIR}/cli_gpumap.jsonl)
da_run_cli(cli_gpumap_shared_np3 3 0 ENV DISTATTN_TEST_GPUS=1
           OUT_RE "GPU map: 3 ranks on this node, 1 GPU visible: ranks share GPUs \\(3 per GPU.*#  Rank  0 Group  0 Pid +[0-9]+ on +[^ ]+ device  0 .*local 0/3, 3 on this GPU.*#  Rank  2 Group  0 Pid +[0-9]+ on +[^ ]+ device  0 .*# PASS"
           JSON ${gm_json} JSON_RE "\"device\":\"cuda\".*\"gpu_map\":\\[\\{\"rank\":0,\"host\":\"[^\"]+\",\"device\":0,\"busid\":\"-\",\"name\":\"[^\"]*\",\"per_gpu\":3\\},.*\\{\"rank\":2,.*\"per_gpu\":3\\}\\]"
           ARGS ${g_args} --device cuda --json ${gm_json})
da_run_cli(cli_gpumap_one_per_gpu_np3 3 0 ENV DISTATTN_TEST_GPUS=4
           OUT_RE "GPU map: one rank per GPU.*Rank  1 Group  0 Pid +[0-9]+ on +[^ ]+ device  1 .*Rank  2 Group  0 Pid +[0-9]+ on +[^ ]+ device  2 .*# PASS"
           ARGS ${g_args} --device cuda)
da_run_cli(cli_gpumap_ranks_per_gpu_np4 4 0 ENV DISTATTN_TEST_GPUS=2
           OUT_RE "GPU map: --ranks-per-gpu 2: 4 ranks share 2 GPUs.*Rank  1 Group .* device  0 .*Rank  2 Group .* device  1 .*Rank  3 Group .* device  1 .*# PASS"
           ARGS ${g_args} --device cuda --ranks-per-gpu 2)
da_run_cli(cli_gpumap_too_few_gpus_np3 3 2 ENV DISTATTN_TEST_GPUS=1
           ERR_RE "--ranks-per-gpu 1: 3 ranks on this node need 3 GPUs, 1 is visible"
           ARGS ${g_args} --device cuda --ranks-per-gpu 1)
da_run_cli(cli_gpumap_nccl_shared_np2 2 2 ENV DISTATTN_TEST_GPUS=1
           ERR_RE "--transport nccl: NCCL refuses ranks that share a GPU \\(\"Duplicate GPU detected\"\\).*cuda-ipc"
           ARGS ${g_args} --device cuda --transport nccl)
# decode --device cuda on pretend GPUs: the map in the header, the device tree on the host seam
# (host-ipc: pages and partials in shared memory, two allreduces), verified in float64.
set(gd_json ${CMAKE_CURRENT_BINARY_DIR}/cli_gpumap_decode.jsonl)
da_run_cli(cli_gpumap_decode_np3 3 0 ENV DISTATTN_TEST_GPUS=2
           OUT_RE "transport: host-ipc.*GPU map: 3 ranks on this node, 2 GPUs visible: ranks share GPUs \\(1 or 2 per GPU.*Rank  2 Group  0 .* device  1 .*combine: device tree on host-ipc.*# wrong: 0.# PASS"
           JSON ${gd_json} JSON_RE "\"cmd\":\"decode\".*\"device\":\"cuda\".*\"gpu_map\":\\[.*\"per_gpu\":2\\},.*\"device\":1,.*\\]"
           RAW_ARGS -np 3 $<TARGET_FILE:distattn> decode --context 1001 --batch 2 --heads 8 --kv-heads 2 --dim 64
                    --steps 2 --verify 8 --device cuda --json ${gd_json})
