// Stand-in for the CUDA toolkit's math_constants.h when no toolkit is installed: the constants
// csrc/greedy_kernel.cuh uses, defined as the toolkit defines them.
#pragma once
#define CUDART_INF_F __int_as_float(0x7f800000U)
#define CUDART_INF __longlong_as_double(0x7ff0000000000000ULL)
