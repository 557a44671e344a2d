// Does a row's result depend on which repacked Q4_K kernel its batch sends it through?
//
// ggml's repacked Q4_K (q4_K_8x8, CPU_REPACK) computes a matmul's rows in groups: 16-row and
// 4-row GEMMs (ggml_gemm_q4_K_8x8_q8_K, rows quantized by ggml_quantize_mat_q8_K_4x8), and a
// one-row GEMV (ggml_gemv_q4_K_8x8_q8_K, rows quantized by quantize_row_q8_K) for the rest
// (ggml-cpu/repack.cpp, forward_mul_mat_one_chunk). This program runs the same rows through all
// three, straight on the kernels, and counts the outputs whose bits differ. Issue 26: stock
// llama.cpp 0.3.36's GEMV differs in about 3 of 4 outputs (by a few ulps: it scaled a whole
// super-block's int32 sum once, the GEMMs scale each pair of sub-blocks); with
// scripts/patches/ggml-cpu-q4_K-gemv-order.patch, none does. Exits 1 if any output differs.
//
// Build against the llama.cpp that scripts/install builds (its sdist, patched or not), e.g.:
//   V=<sdist>/vendor/llama.cpp/ggml  L=.venv/lib/python3.11/site-packages/llama_cpp/lib
//   sed -n '/^static block_q4_Kx8 make_block_q4_Kx8/,/^}/p' $V/src/ggml-cpu/repack.cpp > make_block.inc
//   g++ -O3 -march=native -c -I$V/include -I$V/src -I$V/src/ggml-cpu -I$V/src/ggml-cpu/arch/x86 \
//       $V/src/ggml-cpu/arch/x86/repack.cpp -o x86_repack.o
//   g++ -O2 -march=native -ffp-contract=off -I$V/include -I$V/src -I$V/src/ggml-cpu -I. \
//       bench/kernels/q4_K_rows.cpp x86_repack.o -o q4_K_rows -L$L -lggml-base -Wl,-rpath,$L
//   ./q4_K_rows [trials=40] [columns=32]
// (-march=native: AVX-512's GEMM loops where the CPU has them; -mavx2 -mfma -mf16c -mbmi2 instead
// gives exactly the code an AVX2-only CPU runs.) Columns: 8 takes AVX2's loops even on an
// AVX-512 build, 32 the AVX-512 ones, 48 both.
#define GGML_COMMON_DECL_CPP
#include "ggml-common.h"
#include "ggml.h"
#include "repack.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

extern "C" {
void quantize_row_q4_K_ref(const float * x, block_q4_K * y, int64_t k);
void quantize_row_q8_K_ref(const float * x, block_q8_K * y, int64_t k);
}
#include "make_block.inc"   // repack.cpp's make_block_q4_Kx8 (static there)

// ggml-cpu's conversion tables, which the x86 kernels' object file refers to
float ggml_table_f32_f16[1 << 16];
float ggml_table_f32_e8m0_half[1 << 8];

int main(int argc, char ** argv) {
    const int trials = argc > 1 ? atoi(argv[1]) : 40;
    const int N = argc > 2 ? atoi(argv[2]) : 32;      // weight rows (output columns), a multiple of 8
    const int nb = 4, K = 256 * nb, R = 16;           // 4 super-blocks per row; 16 activation rows
    for (int i = 0; i < (1 << 16); i++) {
        ggml_fp16_t h;
        memcpy(&h, &i, sizeof(h));
        ggml_table_f32_f16[i] = ggml_fp16_to_fp32(h);
    }
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0, 1);
    std::vector<float> w(K * N);
    for (float & v : w) v = normal(rng) * 0.05f;
    std::vector<block_q4_K> wq(nb * N);
    for (int c = 0; c < N; c++) quantize_row_q4_K_ref(w.data() + c * K, wq.data() + c * nb, K);
    std::vector<block_q4_Kx8> wr(nb * N / 8);         // as CPU_REPACK holds them
    for (int g = 0; g < N / 8; g++) {
        for (int b = 0; b < nb; b++) {
            block_q4_K eight[8];
            for (int c = 0; c < 8; c++) eight[c] = wq[(g * 8 + c) * nb + b];
            wr[g * nb + b] = make_block_q4_Kx8(eight, 8);
        }
    }
    long total = 0, vs16 = 0, vs4 = 0;
    for (int t = 0; t < trials; t++) {
        std::vector<float> x(K * R);                  // activations with a few large outliers
        for (float & v : x) { v = normal(rng); if (rng() % 97 == 0) v *= 50; }
        std::vector<block_q8_Kx4> x4(nb * R / 4);
        for (int g = 0; g < R / 4; g++) ggml_quantize_mat_q8_K_4x8(x.data() + g * 4 * K, x4.data() + g * nb, K);
        std::vector<float> y16(R * N), y4(4 * N), y1(N);
        ggml_gemm_q4_K_8x8_q8_K(K, y16.data(), N, wr.data(), x4.data(), R, N);
        ggml_gemm_q4_K_8x8_q8_K(K, y4.data(), N, wr.data(), x4.data(), 4, N);
        for (int r = 0; r < R; r++) {
            std::vector<block_q8_K> x1(nb);
            quantize_row_q8_K_ref(x.data() + r * K, x1.data(), K);
            ggml_gemv_q4_K_8x8_q8_K(K, y1.data(), N, wr.data(), x1.data(), 1, N);
            for (int c = 0; c < N; c++) {
                total++;
                vs16 += memcmp(&y1[c], &y16[r * N + c], sizeof(float)) != 0;
                vs4 += r < 4 && memcmp(&y1[c], &y4[r * N + c], sizeof(float)) != 0;
            }
        }
    }
    printf("%d columns: of %ld outputs, the one-row GEMV differs from the 16-row GEMM in %ld, "
           "from the 4-row GEMM in %ld\n", N, total, vs16, vs4);
    return vs16 || vs4 ? 1 : 0;
}
