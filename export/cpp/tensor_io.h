// The CBT1 raw tensor format shared by the C++ runner and capsbench.export.cpp (write_tensor/read_tensor).
// A file holds one or more records back to back; every number is little-endian:
//
//   bytes   what
//   4       magic "CBT1"
//   4       uint32 dtype: the ONNX TensorProto element type (1 float32, 2 uint8, 3 int8, 5 int16, 6 int32,
//           7 int64, 9 bool, 10 float16, 11 float64)
//   4       uint32 ndim
//   8*ndim  int64 dims
//   ...     prod(dims) * itemsize bytes of data, C order
//
// The runner reads the first record of --input and writes one record per model output to --output.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the CBT1 reader/writer assumes a little-endian host"
#endif

namespace cbt {

constexpr char kMagic[4] = {'C', 'B', 'T', '1'};
constexpr uint32_t kMaxDims = 16;

// Thrown for a file that is missing, truncated or not CBT1; the message names the file.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline size_t itemsize(uint32_t dtype) {
  switch (dtype) {
    case 2: case 3: case 9: return 1;  // uint8, int8, bool
    case 5: case 10: return 2;         // int16, float16
    case 1: case 6: return 4;          // float32, int32
    case 7: case 11: return 8;         // int64, float64
    default: return 0;                 // not supported by this format
  }
}

inline std::string dtype_name(uint32_t dtype) {
  switch (dtype) {
    case 1: return "float32";
    case 2: return "uint8";
    case 3: return "int8";
    case 5: return "int16";
    case 6: return "int32";
    case 7: return "int64";
    case 9: return "bool";
    case 10: return "float16";
    case 11: return "float64";
    default: return "dtype " + std::to_string(dtype);
  }
}

struct Tensor {
  uint32_t dtype = 1;
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

inline std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += dims[i] < 0 ? std::string("?") : std::to_string(dims[i]);
  }
  return s + (dims.size() == 1 ? ",)" : ")");
}

// The first record of `path`.
inline Tensor read_tensor(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw FormatError(path + ": cannot open the input file");
  f.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  char magic[4];
  uint32_t head[2];
  if (!f.read(magic, 4) || std::memcmp(magic, kMagic, 4) != 0)
    throw FormatError(path + ": not a CBT1 tensor file (bad magic); write it with capsbench.export.cpp.write_tensor");
  if (!f.read(reinterpret_cast<char*>(head), sizeof head)) throw FormatError(path + ": truncated CBT1 header");
  Tensor t;
  t.dtype = head[0];
  const uint32_t ndim = head[1];
  if (itemsize(t.dtype) == 0) throw FormatError(path + ": unsupported dtype code " + std::to_string(t.dtype));
  if (ndim > kMaxDims) throw FormatError(path + ": corrupt CBT1 header (ndim " + std::to_string(ndim) + ")");
  t.dims.resize(ndim);
  if (ndim && !f.read(reinterpret_cast<char*>(t.dims.data()), 8 * ndim))
    throw FormatError(path + ": truncated CBT1 header");
  uint64_t bytes = itemsize(t.dtype);
  for (int64_t d : t.dims) {
    if (d < 0) throw FormatError(path + ": negative dimension in " + shape_str(t.dims));
    bytes *= static_cast<uint64_t>(d);
  }
  const uint64_t header = 12 + 8 * static_cast<uint64_t>(ndim);
  if (file_size < header + bytes)
    throw FormatError(path + ": truncated: shape " + shape_str(t.dims) + " " + dtype_name(t.dtype) + " needs " +
                      std::to_string(bytes) + " data bytes, the file has " + std::to_string(file_size - header));
  t.data.resize(bytes);
  if (bytes && !f.read(reinterpret_cast<char*>(t.data.data()), static_cast<std::streamsize>(bytes)))
    throw FormatError(path + ": read error");
  return t;
}

inline void append_record(std::ofstream& f, uint32_t dtype, const std::vector<int64_t>& dims, const void* data,
                          size_t bytes) {
  const uint32_t head[2] = {dtype, static_cast<uint32_t>(dims.size())};
  f.write(kMagic, 4);
  f.write(reinterpret_cast<const char*>(head), sizeof head);
  f.write(reinterpret_cast<const char*>(dims.data()), static_cast<std::streamsize>(8 * dims.size()));
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

}  // namespace cbt
