// Minimal stand-in for CUDA's crt/host_defines.h (shipped with nvcc, not with the cudart wheel), for
// compiling CUDA's fp16/bf16/fp8 headers and the kernels with g++ on the host (tests/cuda_emu).
#pragma once
#ifndef __HOST_DEFINES_H__
#define __HOST_DEFINES_H__
#define __no_return__ __attribute__((noreturn))
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __inline_hint__
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(a) __align__(a)
#define __thread__ __thread
#define __import__
#define __export__
#define __cdecl
#define __annotate__(a)
#define __location__(a)
#define CUDARTAPI
#define CUDARTAPI_CDECL
#define __specialization_static
#define __launch_bounds__(...)
#define __grid_constant__
#define __host__
#define __device__
#define __global__
#define __constant__
#define __managed__
#define __nv_pure__
#define __device_builtin__
#define __device_builtin_texture_type__
#define __device_builtin_surface_type__
#define __cudart_builtin__
#define __cluster_dims__(...)
#endif
