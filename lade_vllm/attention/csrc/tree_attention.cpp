// Tree-masked attention straight from vLLM's CPU paged KV cache (vec layout), no gather.
//
// One call per layer computes, for every tree request r, every tree node i and every query head,
//     softmax(q . K[j] * scale) . V over the keys j in [0, p_r) and the tree nodes that are
//     ancestors of i (themselves included), which sit at logical positions p_r + node index,
// reading K/V block by block through the request's block table. The cache region of one
// (block, kv head) holds K of token t, dim d at k_off + t * k_so + d * k_sd and V at
// v_off + t * v_so + d * v_sd (lade_vllm.attention.kv_layout.strided_layout); this kernel needs
// k_so == 1 (K stored [hd, bs]) and v_sd == 1 (V stored [bs, hd]), vLLM 0.32's vec ISA.
// Online softmax per row (flash attention) in float32. float32 inputs: float32 products; bfloat16
// inputs on CPUs with AVX512-BF16: q.K and w.V through bf16 dot products with float32
// accumulation (the weights w rounded to bf16), else widened to float32.
// Work items: (request, kv head, up to 16 query rows); the rows of one kv head are its G query
// heads x the request's nodes, node-major. Parallel over items with ATen's intra-op pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LADE_BF16_DOT 1   // bf16 inputs: products through AVX512-BF16 dot products
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));

constexpr int ROWS_BF16 = 16;   // query rows per work item (fewer for a head's last rows)
constexpr int ROWS_F32 = 8;
constexpr int W = 16;      // floats per vector

inline v16 splat(float x) { return v16{} + x; }

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v16 load16(const c10::BFloat16* p) {
  h16v h;
  std::memcpy(&h, p, sizeof(h));
  u16v u = __builtin_convertvector(h, u16v) << 16;
  v16 v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (scores minus their running max): 2^n * poly(r), |r| <= ln2 / 2, relative
// error ~1e-7; exp(-inf) and anything below -87 give 0.
inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.0f);
  v16 xc = x < lo ? lo : x;
  v16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   // round to nearest
  v16 r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  v16 p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  v16 out = p * scale;
  return x < lo ? splat(0.0f) : out;
}

inline float hmax(v16 v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

#ifdef LADE_BF16_DOT
// 16 bf16 of row a and 16 of row b (b null: zeros) as 16 (a, b) pairs for _mm512_dpbf16_ps; the
// pairs come in lane order UNPERM (unpack works within 128-bit lanes), undone on the results.
inline __m512i pairs(const uint16_t* a, const uint16_t* b) {
  __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  __m256i y = b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)) : _mm256_setzero_si256();
  __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

inline __m512 unperm(__m512 v) {
  const __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
  return _mm512_permutexvar_ps(idx, v);
}

inline __m512 dot2(__m512 acc, __m512i pairs_, uint32_t both) {
  return _mm512_dpbf16_ps(acc, (__m512bh)pairs_, (__m512bh)_mm512_set1_epi32(both));
}
#endif

struct Args {
  const void* query;
  int64_t q_stride;          // elements between query rows
  void* output;
  int64_t o_stride;
  const void* cache;         // [nb, kvh, bs, 2 * hd]
  int64_t num_blocks, kvh, bs, hd, heads;
  int64_t k_off, k_sd, v_off, v_so;
  const int32_t* block_table;  // [R, nblk]
  int64_t nblk;
  const int64_t* query_rows;   // [R, Tq]
  int64_t tq;
  const int64_t* sizes;        // [R]
  const int64_t* prefixes;     // [R]
  const uint8_t* anc;          // [R, Tq, Tq]
  float scale;
};

template <typename T, int NR>
void run_item(const Args& a, int64_t r, int64_t h, int64_t row0) {
  const int64_t G = a.heads / a.kvh, n_nodes = a.sizes[r], p = a.prefixes[r];
  const int64_t nrows = std::min<int64_t>(NR, n_nodes * G - row0);
  const int64_t hd = a.hd, bs = a.bs, region = 2 * bs * hd;
  const T* cache = static_cast<const T*>(a.cache);
  const T* query = static_cast<const T*>(a.query);
  const int nv = static_cast<int>(hd / W);

  // rows of this item: node = row / G, head = h * G + row % G; padded rows repeat the last
  int64_t node[NR], head[NR];
  alignas(64) float q[NR][256];
#ifdef LADE_BF16_DOT
  uint32_t qp[NR][128];
  std::vector<uint16_t> wbuf(NR * (bs + 2));
#endif
  for (int k = 0; k < NR; ++k) {
    int64_t row = row0 + std::min<int64_t>(k, nrows - 1);
    node[k] = row / G;
    head[k] = h * G + row % G;
    const T* src = query + a.query_rows[r * a.tq + node[k]] * a.q_stride + head[k] * hd;
    for (int64_t d = 0; d < hd; ++d) q[k][d] = to_float(src[d]) * a.scale;
#ifdef LADE_BF16_DOT
    if constexpr (std::is_same_v<T, c10::BFloat16>) {   // unscaled bf16 pairs (d, d + 1)
      const uint16_t* qb = reinterpret_cast<const uint16_t*>(src);
      for (int64_t d = 0; d < hd; d += 2) qp[k][d / 2] = qb[d] | (uint32_t(qb[d + 1]) << 16);
    }
#endif
  }
  alignas(64) float acc[NR][256];
  std::memset(acc, 0, sizeof(acc));
  float m[NR], l[NR];
  for (int k = 0; k < NR; ++k) { m[k] = -std::numeric_limits<float>::infinity(); l[k] = 0.f; }
  std::vector<float> sbuf(NR * bs);
  float* s = sbuf.data();
  const uint8_t* anc = a.anc + r * a.tq * a.tq;
  const int64_t end = p + n_nodes;   // keys: the prefix, then the tree's nodes

  for (int64_t b0 = 0; b0 < end; b0 += bs) {
    const int64_t blk = a.block_table[r * a.nblk + b0 / bs];
    const T* base = cache + (blk * a.kvh + h) * region;
    const int64_t cnt = std::min(bs, end - b0);
    const int64_t nchunks = (cnt + W - 1) / W;
    // scores: s[k][t] = q[k] . K[t]
#ifdef LADE_BF16_DOT
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const uint16_t* kb = reinterpret_cast<const uint16_t*>(base + a.k_off);
      for (int64_t c = 0; c < nchunks; ++c) {
        __m512 sc[NR];
        for (int k = 0; k < NR; ++k) sc[k] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d += 2) {
          __m512i z = pairs(kb + d * a.k_sd + c * W, kb + (d + 1) * a.k_sd + c * W);
          for (int k = 0; k < NR; ++k) sc[k] = dot2(sc[k], z, qp[k][d / 2]);
        }
        for (int k = 0; k < NR; ++k)
          _mm512_storeu_ps(s + k * bs + c * W, _mm512_mul_ps(unperm(sc[k]), _mm512_set1_ps(a.scale)));
      }
    } else
#endif
    for (int64_t c = 0; c < nchunks; ++c) {
      v16 sc[NR];
      for (int k = 0; k < NR; ++k) sc[k] = splat(0.f);
      const T* kp = base + a.k_off + c * W;
      for (int64_t d = 0; d < hd; ++d) {
        v16 kv = load16(kp + d * a.k_sd);
        for (int k = 0; k < NR; ++k) sc[k] += q[k][d] * kv;
      }
      for (int k = 0; k < NR; ++k) std::memcpy(s + k * bs + c * W, &sc[k], sizeof(v16));
    }
    // mask: past the keys, and tree nodes that are not the row's ancestors
    const int64_t padded = nchunks * W;
    for (int k = 0; k < NR && (cnt < padded || b0 + cnt > p); ++k) {
      float* sk = s + k * bs;
      const uint8_t* ak = anc + node[k] * a.tq;
      for (int64_t t = 0; t < padded; ++t) {
        int64_t pos = b0 + t;
        if (t >= cnt || (pos >= p && !ak[pos - p])) sk[t] = -std::numeric_limits<float>::infinity();
      }
    }
    // online softmax: rescale the accumulators to the new running max, scores -> weights
    for (int k = 0; k < NR; ++k) {
      float* sk = s + k * bs;
      v16 mx = splat(-std::numeric_limits<float>::infinity());
      for (int64_t c = 0; c < nchunks; ++c) {
        v16 v = load16(sk + c * W);
        mx = v > mx ? v : mx;
      }
      float bm = hmax(mx);
      if (bm == -std::numeric_limits<float>::infinity()) {
        std::memset(sk, 0, sizeof(float) * padded);
        continue;
      }
      float mn = std::max(m[k], bm);
      float corr = m[k] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m[k] - mn);
      v16 sum = splat(0.f);
      for (int64_t c = 0; c < nchunks; ++c) {
        v16 e = vexp(load16(sk + c * W) - mn);
        std::memcpy(sk + c * W, &e, sizeof(v16));
        sum += e;
      }
      l[k] = l[k] * corr + hsum(sum);
      m[k] = mn;
      if (corr != 1.f)
        for (int64_t d = 0; d < hd; ++d) acc[k][d] *= corr;
    }
    // acc[k] += sum_t w[k][t] * V[t], four rows at a time
#ifdef LADE_BF16_DOT
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      uint16_t* wb = wbuf.data();   // the weights in bf16, zero past cnt
      const int64_t ws = bs + 2;
      for (int k = 0; k < NR; ++k) {
        for (int64_t c = 0; c < nchunks; ++c)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb + k * ws + c * W),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + k * bs + c * W)));
        wb[k * ws + cnt] = 0;
      }
      const uint16_t* vb = reinterpret_cast<const uint16_t*>(base + a.v_off);
      // tiles of TR rows x JC chunks of 16 dims: 16 accumulators, each V pair feeds TR rows
      constexpr int TR = NR < 8 ? NR : 8, JC = 16 / TR;
      for (int k0 = 0; k0 < NR; k0 += TR) {
        for (int j = 0; j < nv; j += JC) {
          const int nj = std::min(JC, nv - j);
          __m512 ac[TR][JC];
          for (int k = 0; k < TR; ++k)
            for (int jj = 0; jj < JC; ++jj) ac[k][jj] = _mm512_setzero_ps();
          for (int64_t t = 0; t < cnt; t += 2) {
            const uint16_t* v0 = vb + t * a.v_so + j * W;
            const uint16_t* v1 = t + 1 < cnt ? v0 + a.v_so : nullptr;
            __m512i z[JC];
            for (int jj = 0; jj < nj; ++jj) z[jj] = pairs(v0 + jj * W, v1 ? v1 + jj * W : nullptr);
            for (int k = 0; k < TR; ++k) {
              uint32_t both;
              std::memcpy(&both, wb + (k0 + k) * ws + t, sizeof(both));
              for (int jj = 0; jj < nj; ++jj) ac[k][jj] = dot2(ac[k][jj], z[jj], both);
            }
          }
          for (int k = 0; k < TR; ++k)
            for (int jj = 0; jj < nj; ++jj) {
              float* dst = &acc[k0 + k][(j + jj) * W];
              _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), unperm(ac[k][jj])));
            }
        }
      }
      continue;
    }
#endif
    for (int k0 = 0; k0 < NR; k0 += 4) {
      for (int j = 0; j < nv; j += 4) {
        const int nj = std::min(4, nv - j);
        v16 ac[4][4];
        for (int k = 0; k < 4; ++k)
          for (int jj = 0; jj < nj; ++jj) ac[k][jj] = load16(&acc[k0 + k][(j + jj) * W]);
        for (int64_t t = 0; t < cnt; ++t) {
          const T* vp = base + a.v_off + t * a.v_so + j * W;
          v16 vv[4];
          for (int jj = 0; jj < nj; ++jj) vv[jj] = load16(vp + jj * W);
          for (int k = 0; k < 4; ++k) {
            float w = s[(k0 + k) * bs + t];
            for (int jj = 0; jj < nj; ++jj) ac[k][jj] += w * vv[jj];
          }
        }
        for (int k = 0; k < 4; ++k)
          for (int jj = 0; jj < nj; ++jj)
            std::memcpy(&acc[k0 + k][(j + jj) * W], &ac[k][jj], sizeof(v16));
      }
    }
  }
  T* out = static_cast<T*>(a.output);
  for (int k = 0; k < nrows; ++k) {
    T* dst = out + a.query_rows[r * a.tq + node[k]] * a.o_stride + head[k] * hd;
    const float inv = 1.f / l[k];
    for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<T>(acc[k][d] * inv);
  }
}

}  // namespace

// query/output: [N, heads * hd] (rows may be strided); kv_cache: [nb, kvh, bs, 2 * hd];
// block_table: [R, nblk] int32; query_rows: [R, Tq] int64; sizes, prefixes: [R] int64;
// anc: [R, Tq, Tq] uint8 (anc[r, i, j]: node i attends node j); layout: k_off, k_so, k_sd,
// v_off, v_so, v_sd.
void tree_attention(const torch::Tensor& query, torch::Tensor& output,
                    const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                    const torch::Tensor& query_rows, const torch::Tensor& sizes,
                    const torch::Tensor& prefixes, const torch::Tensor& anc,
                    std::vector<int64_t> layout, int64_t heads, double scale) {
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 4, "kv_cache: contiguous 4-D");
  TORCH_CHECK(query.dim() == 2 && query.stride(1) == 1, "query: [N, heads * hd], rows dense");
  TORCH_CHECK(output.dim() == 2 && output.stride(1) == 1, "output: [N, heads * hd]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
              output.scalar_type() == kv_cache.scalar_type(), "query, output, cache: one dtype");
  TORCH_CHECK(block_table.scalar_type() == torch::kInt32 && block_table.is_contiguous(),
              "block_table: contiguous int32");
  TORCH_CHECK(query_rows.scalar_type() == torch::kInt64 && sizes.scalar_type() == torch::kInt64
              && prefixes.scalar_type() == torch::kInt64, "rows, sizes, prefixes: int64");
  TORCH_CHECK(anc.scalar_type() == torch::kUInt8 && anc.is_contiguous(), "anc: uint8");
  TORCH_CHECK(layout.size() == 6 && layout[1] == 1 && layout[5] == 1,
              "layout: K token stride 1 and V dim stride 1 (vec ISA)");
  Args a;
  a.query = query.data_ptr();
  a.q_stride = query.stride(0);
  a.output = output.data_ptr();
  a.o_stride = output.stride(0);
  a.cache = kv_cache.data_ptr();
  a.num_blocks = kv_cache.size(0);
  a.kvh = kv_cache.size(1);
  a.bs = kv_cache.size(2);
  a.hd = kv_cache.size(3) / 2;
  a.heads = heads;
  TORCH_CHECK(a.hd % W == 0 && a.hd <= 256 && a.bs % W == 0, "head size and block size: "
              "multiples of 16, head size <= 256");
  TORCH_CHECK(heads % a.kvh == 0 && query.size(1) == heads * a.hd, "heads x head size");
  a.k_off = layout[0];
  a.k_sd = layout[2];
  a.v_off = layout[3];
  a.v_so = layout[4];
  auto qr = query_rows.contiguous();
  auto sz = sizes.contiguous();
  auto px = prefixes.contiguous();
  a.block_table = block_table.data_ptr<int32_t>();
  a.nblk = block_table.size(1);
  a.query_rows = qr.data_ptr<int64_t>();
  a.tq = query_rows.size(1);
  a.sizes = sz.data_ptr<int64_t>();
  a.prefixes = px.data_ptr<int64_t>();
  a.anc = anc.data_ptr<uint8_t>();
  a.scale = static_cast<float>(scale);
  const int64_t R = sizes.size(0), G = heads / a.kvh;
  const bool bf16 = kv_cache.scalar_type() == torch::kBFloat16;
  const int64_t rows_per_item = bf16 ? ROWS_BF16 : ROWS_F32;
  std::vector<int64_t> items;   // (r, h, row0) triples
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK((a.prefixes[r] + a.sizes[r] + a.bs - 1) / a.bs <= a.nblk, "block table short");
    // 16-row items where a head has rows enough to keep the threads busy, else 8-row ones
    const int64_t step = a.sizes[r] * G >= 32 ? rows_per_item : ROWS_F32;
    for (int64_t h = 0; h < a.kvh; ++h)
      for (int64_t row0 = 0; row0 < a.sizes[r] * G; row0 += step) {
        items.push_back(r);
        items.push_back(h);
        items.push_back(row0);
      }
  }
  const int64_t n = static_cast<int64_t>(items.size() / 3);
  TORCH_CHECK(bf16 || kv_cache.scalar_type() == torch::kFloat32, "dtype: float32 or bfloat16");
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = items[3 * i], h = items[3 * i + 1], row0 = items[3 * i + 2];
      const int64_t rows = a.sizes[r] * G, left = rows - row0;   // rows from row0 to the last
      if (bf16) {
        if (left > 8 && rows >= 32) run_item<c10::BFloat16, 16>(a, r, h, row0);
        else if (left > 4) run_item<c10::BFloat16, 8>(a, r, h, row0);
        else run_item<c10::BFloat16, 4>(a, r, h, row0);
      } else {
        if (left > 4) run_item<float, 8>(a, r, h, row0);
        else run_item<float, 4>(a, r, h, row0);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention", &tree_attention, "tree-masked attention over vLLM's CPU paged cache");
}
