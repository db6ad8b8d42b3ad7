// stream_cpu.cpp built for AVX512 (flags in CMakeLists.txt); chosen at run time (cpu/isa.h).
#define LOOM_ISA_AVX512 1
#include "cpu/stream_cpu.cpp"
