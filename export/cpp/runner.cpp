// capsbench-runner: time an ONNX model with ONNX Runtime's C++ API exactly the way capsbench's Python harness
// (capsbench.export.latency) does, and print its JSON: one row per batch size with the same fields and units.
//
// Build: see CMakeLists.txt (cmake -DONNXRUNTIME_ROOT=... ; provision_ort.sh makes such a root).
#define ORT_API_MANUAL_INIT  // the API version is requested (and checked) in main(), not at static init
#include <onnxruntime_cxx_api.h>

#include <dlfcn.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tensor_io.h"

namespace {

constexpr int kSchemaVersion = 1;
constexpr int kMinIters = 5;  // timed runs kept before --max-seconds may stop a batch size early

// Exit codes (also listed in --help).
enum Exit : int {
  kOk = 0,
  kFailed = 1,       // anything else (ONNX Runtime error outside a timed batch size, I/O error)
  kUsage = 2,        // bad or missing option
  kBadModel = 3,     // model file missing, unreadable or not a model the runner can feed
  kBadInput = 4,     // input file missing/corrupt, or its shape/dtype does not fit the model
  kNoProvider = 5,   // the requested execution provider is not available
  kBatchFailed = 6,  // the JSON was written but at least one batch size failed (its row has the error)
};

struct Fatal {
  int code;
  std::string message;
};

[[noreturn]] void fail(int code, const std::string& message) { throw Fatal{code, message}; }

// ONNX Runtime's messages span lines; an error here is always one line.
std::string one_line(const std::string& s) {
  std::string out;
  for (char c : s) {
    const bool space = c == '\n' || c == '\r' || c == '\t' || c == ' ';
    if (space && (out.empty() || out.back() == ' ')) continue;
    out += space ? ' ' : c;
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

const char* kUsageText = R"(Usage: capsbench-runner --model MODEL.onnx [options]

Times MODEL with ONNX Runtime (C++ API) like capsbench's Python harness: per batch size one first run
(reported as first_run_ms), WARMUP-1 more untimed runs, then ITERS timed runs; prints JSON with, per batch
size, the raw samples: every timed run in order (samples_ms) and the first run (first_run_ms). capsbench
computes percentiles, spread and stability from them in Python, as for every other backend.

Options:
  --model FILE        the ONNX model (one input; axis 0 of the input is the batch axis)
  --input FILE        input tensor in the CBT1 raw format (capsbench.export.cpp.write_tensor); batch b takes
                      its first b rows, cycling when there are fewer. Default: uniform [0, 1) float32 of the
                      model's input shape (fixed non-batch axes needed), seeded by --seed
  --batch N[,N...]    batch sizes, repeatable (default: the input file's batch, else 1)
  --provider P        cpu (default) or cuda; exits 5 when the provider is not available (never falls back)
  --threads N         intra-op threads (default: the cores this process may run on)
  --warmup N          runs per batch size before timing, the first included (default 10)
  --iters N           timed runs per batch size (default 100)
  --max-seconds S     stop warm-up/timing of a batch size after S seconds (at least 5 timed runs are kept)
  --opt-level L       graph optimisation: disable, basic, extended, all (default all, as in Python)
  --io-binding        bind fixed input/output buffers (on CUDA: on the device, so no copy is timed)
  --cuda-graph        capture the whole graph with CUDA graphs (needs --provider cuda; implies --io-binding)
  --device-id N       CUDA device (default 0)
  --seed N            seed of the random input (default 0)
  --output FILE       write the outputs of the last run (last batch size) as CBT1 records, one per output
  --json FILE         write the JSON to FILE instead of stdout
  --help              this text

The JSON's session.placement counts the kernels per provider and op type of one profiled, untimed run at the
first batch size (in a session of its own); session.fallback says so when the requested provider ran no node.

Exit codes: 0 ok, 1 runtime error, 2 usage, 3 bad model, 4 bad input, 5 provider unavailable,
6 some batch size failed (JSON written; its row has status "error").
)";

// ------------------------------------------------------------------------------------------------ options

struct Options {
  std::string model, input, output, json, provider = "cpu", opt_level = "all";
  std::vector<int64_t> batches;
  int threads = 0, warmup = 10, iters = 100, device_id = 0;
  double max_seconds = -1;
  uint64_t seed = 0;
  bool io_binding = false, cuda_graph = false, help = false;
};

long long parse_int(const std::string& opt, const std::string& v, long long min) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || x < min)
    fail(kUsage, opt + " needs an integer >= " + std::to_string(min) + ", got '" + v + "'");
  return x;
}

Options parse_args(int argc, char** argv) {
  Options o;
  const std::vector<std::string> flags = {"--io-binding", "--cuda-graph", "--help", "-h"};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool has_value = false;
    if (auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    if (std::find(flags.begin(), flags.end(), arg) != flags.end()) {
      if (has_value) fail(kUsage, arg + " takes no value");
      if (arg == "--io-binding") o.io_binding = true;
      if (arg == "--cuda-graph") o.cuda_graph = true;
      if (arg == "--help" || arg == "-h") o.help = true;
      continue;
    }
    static const std::vector<std::string> valued = {
        "--model", "--input", "--output", "--json", "--provider", "--threads", "--batch", "--warmup",
        "--iters", "--max-seconds", "--opt-level", "--device-id", "--seed"};
    if (std::find(valued.begin(), valued.end(), arg) == valued.end())
      fail(kUsage, "unknown option '" + std::string(argv[i]) + "' (see --help)");
    if (!has_value) {
      if (i + 1 >= argc) fail(kUsage, arg + " needs a value (see --help)");
      value = argv[++i];
    }
    if (arg == "--model") o.model = value;
    else if (arg == "--input") o.input = value;
    else if (arg == "--output") o.output = value;
    else if (arg == "--json") o.json = value;
    else if (arg == "--provider") o.provider = value;
    else if (arg == "--opt-level") o.opt_level = value;
    else if (arg == "--threads") o.threads = static_cast<int>(parse_int(arg, value, 1));
    else if (arg == "--warmup") o.warmup = static_cast<int>(parse_int(arg, value, 0));
    else if (arg == "--iters") o.iters = static_cast<int>(parse_int(arg, value, 1));
    else if (arg == "--device-id") o.device_id = static_cast<int>(parse_int(arg, value, 0));
    else if (arg == "--seed") o.seed = static_cast<uint64_t>(parse_int(arg, value, 0));
    else if (arg == "--max-seconds") {
      char* end = nullptr;
      o.max_seconds = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(o.max_seconds > 0))
        fail(kUsage, "--max-seconds needs a number > 0, got '" + value + "'");
    } else if (arg == "--batch") {
      std::stringstream ss(value);
      std::string part;
      while (std::getline(ss, part, ',')) o.batches.push_back(parse_int("--batch", part, 1));
      if (value.empty() || value.back() == ',') fail(kUsage, "--batch needs N or a comma list, got '" + value + "'");
    }
  }
  if (o.help) return o;
  if (o.model.empty()) fail(kUsage, "--model is required (see --help)");
  if (o.provider != "cpu" && o.provider != "cuda")
    fail(kUsage, "--provider must be cpu or cuda, got '" + o.provider + "'");
  static const std::vector<std::string> levels = {"disable", "basic", "extended", "all"};
  if (std::find(levels.begin(), levels.end(), o.opt_level) == levels.end())
    fail(kUsage, "--opt-level must be disable, basic, extended or all, got '" + o.opt_level + "'");
  if (o.cuda_graph && o.provider != "cuda") fail(kUsage, "--cuda-graph needs --provider cuda");
  if (o.cuda_graph) o.io_binding = true;
  // ONNX Runtime captures the CUDA graph on the 2nd-3rd run: with fewer warm-up runs the capture would land in
  // timed calls (capsbench.export.latency.MIN_GRAPH_WARMUP, the same rule on the Python side).
  if (o.cuda_graph && o.warmup < 3) o.warmup = 3;
  return o;
}

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return 1;
}

GraphOptimizationLevel opt_level(const std::string& name) {
  if (name == "disable") return ORT_DISABLE_ALL;
  if (name == "basic") return ORT_ENABLE_BASIC;
  if (name == "extended") return ORT_ENABLE_EXTENDED;
  return ORT_ENABLE_ALL;
}

bool mentions_cuda(const std::string& s) {
  for (const char* w : {"CUDA", "cuda", "cudnn", "cuDNN", "cublas", "libcu"})
    if (s.find(w) != std::string::npos) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------------- JSON

// A JSON value already rendered; objects keep their key order.
struct Json {
  std::string text;
  static Json str(const std::string& s) {
    std::string out = "\"";
    for (unsigned char c : s) {
      if (c == '"' || c == '\\') out += '\\', out += static_cast<char>(c);
      else if (c == '\n') out += "\\n";
      else if (c == '\t') out += "\\t";
      else if (c < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
        out += buf;
      } else out += static_cast<char>(c);
    }
    return {out + "\""};
  }
  static Json num(double x) {
    if (!std::isfinite(x)) return {"null"};
    char buf[32];
    for (int digits : {15, 16, 17}) {  // the shortest text that reads back as the same double, like Python's
      std::snprintf(buf, sizeof buf, "%.*g", digits, x);
      if (std::strtod(buf, nullptr) == x) break;
    }
    std::string out = buf;
    if (out.find_first_of(".eEn") == std::string::npos) out += ".0";  // stays a float in Python
    return {out};
  }
  static Json integer(long long x) { return {std::to_string(x)}; }
  static Json boolean(bool b) { return {b ? "true" : "false"}; }
  static Json null() { return {"null"}; }
  static Json ints(const std::vector<int64_t>& v) {
    std::vector<Json> items;
    for (auto x : v) items.push_back(integer(x));
    return array(items);
  }
  static Json strs(const std::vector<std::string>& v) {
    std::vector<Json> items;
    for (auto& x : v) items.push_back(str(x));
    return array(items);
  }
  static Json array(const std::vector<Json>& items) {
    std::string out = "[";
    for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i].text;
    return {out + "]"};
  }
  static Json object(const std::vector<std::pair<std::string, Json>>& fields, int indent = -1) {
    const std::string nl = indent < 0 ? "" : "\n" + std::string(indent + 2, ' ');
    std::string out = "{";
    for (size_t i = 0; i < fields.size(); ++i)
      out += (i ? "," : "") + (indent < 0 && i ? std::string(" ") : nl) + str(fields[i].first).text + ": " +
             fields[i].second.text;
    return {out + (indent < 0 ? "" : "\n" + std::string(indent, ' ')) + "}"};
  }
};

// --------------------------------------------------------------------------------------------- statistics

// The raw samples of one batch size: every timed run in order (ms) and the first run alone. The statistics
// (percentiles, spread, stability) are computed in Python by the one summariser every backend goes through
// (capsbench.export.latency.summarize), which `capsbench check` resamples from.
std::vector<std::pair<std::string, Json>> samples(const std::vector<double>& seconds, int64_t batch, double first_s) {
  std::vector<Json> items;
  for (double s : seconds) items.push_back(Json::num(s * 1e3));
  return {
      {"batch", Json::integer(batch)},
      {"iters", Json::integer(static_cast<long long>(seconds.size()))},
      {"first_run_ms", Json::num(first_s * 1e3)},
      {"samples_ms", Json::array(items)},
  };
}

// ---------------------------------------------------------------------------------------------------- CUDA

// cudaMemcpy from the CUDA runtime that ONNX Runtime's CUDA provider already loaded: the runner itself does
// not link CUDA, so it builds and runs on machines without it.
struct CudaRuntime {
  using Memcpy = int (*)(void*, const void*, size_t, int);
  using Sync = int (*)();
  Memcpy memcpy = nullptr;
  Sync synchronize = nullptr;
  static constexpr int kHostToDevice = 1, kDeviceToHost = 2;

  static CudaRuntime load() {
    CudaRuntime rt;
    for (int flags : {RTLD_NOW | RTLD_NOLOAD, RTLD_NOW}) {
      for (const char* name : {"libcudart.so.13", "libcudart.so.12", "libcudart.so"}) {
        if (void* h = dlopen(name, flags)) {
          rt.memcpy = reinterpret_cast<Memcpy>(dlsym(h, "cudaMemcpy"));
          rt.synchronize = reinterpret_cast<Sync>(dlsym(h, "cudaDeviceSynchronize"));
          if (rt.memcpy && rt.synchronize) return rt;
        }
      }
    }
    fail(kNoProvider, "--io-binding on CUDA copies the input to the GPU with cudaMemcpy, but no libcudart.so.13/12 "
                      "could be loaded; add the CUDA runtime's lib folder to LD_LIBRARY_PATH");
  }
  void copy(void* dst, const void* src, size_t bytes, int kind) const {
    if (int err = memcpy(dst, src, bytes, kind); err != 0)
      fail(kFailed, "cudaMemcpy failed (error " + std::to_string(err) + ")");
    if (int err = synchronize(); err != 0)
      fail(kFailed, "cudaDeviceSynchronize failed (error " + std::to_string(err) + ")");
  }
};

// ------------------------------------------------------------------------------------------------- session

struct ModelIO {
  std::string input_name;
  ONNXTensorElementDataType input_type;
  std::vector<int64_t> input_shape;  // -1 for a symbolic axis
  std::vector<std::string> output_names;
  std::vector<std::vector<int64_t>> output_shapes;
  std::vector<ONNXTensorElementDataType> output_types;
};

struct Runtime {
  const Options& opt;
  Ort::Env env{ORT_LOGGING_LEVEL_WARNING, "capsbench-runner"};
  int threads;
  std::vector<std::string> available;

  Runtime(const Options& o, int t) : opt(o), threads(t), available(Ort::GetAvailableProviders()) {}

  Ort::SessionOptions options(bool cuda_graph, const std::string& profile_prefix = "") const {
    Ort::SessionOptions so;
    if (!profile_prefix.empty()) so.EnableProfiling(profile_prefix.c_str());
    so.SetGraphOptimizationLevel(opt_level(opt.opt_level));
    so.SetIntraOpNumThreads(threads);
    so.SetInterOpNumThreads(1);  // a chain of ops: parallelism is inside each op (as in the Python sessions)
    so.SetExecutionMode(ORT_SEQUENTIAL);
    if (opt.provider != "cuda") return so;
    if (std::find(available.begin(), available.end(), "CUDAExecutionProvider") == available.end()) {
      std::string have;
      for (auto& p : available) have += (have.empty() ? "" : ", ") + p;
      fail(kNoProvider, std::string("--provider cuda: this ONNX Runtime (") + Ort::GetVersionString() +
                            ") has no CUDA provider (it has " + have +
                            "); link the runner against onnxruntime-gpu, or use --provider cpu");
    }
    // The Python harness's CUDA options (capsbench.export.sessions.DEFAULT_CUDA_OPTIONS).
    std::vector<std::pair<std::string, std::string>> kv = {
        {"device_id", std::to_string(opt.device_id)},
        {"cudnn_conv_algo_search", "EXHAUSTIVE"},
        {"cudnn_conv_use_max_workspace", "1"},
        {"do_copy_in_default_stream", "1"},
        {"arena_extend_strategy", "kNextPowerOfTwo"},
        {"use_tf32", "0"},
    };
    if (cuda_graph) kv.emplace_back("enable_cuda_graph", "1");
    const OrtApi& api = Ort::GetApi();
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    try {
      Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
      std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> guard(
          cuda, [](OrtCUDAProviderOptionsV2* p) { Ort::GetApi().ReleaseCUDAProviderOptions(p); });
      std::vector<const char*> keys, values;
      for (auto& [k, v] : kv) keys.push_back(k.c_str()), values.push_back(v.c_str());
      Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys.data(), values.data(), keys.size()));
      so.AppendExecutionProvider_CUDA_V2(*cuda);
    } catch (const Ort::Exception& e) {
      fail(kNoProvider, "--provider cuda: could not create ONNX Runtime's CUDA provider (" + one_line(e.what()) +
                            "); check the GPU, CUDA and cuDNN libraries, or use --provider cpu");
    }
    return so;
  }

  Ort::Session open(bool cuda_graph, const std::string& profile_prefix = "") const {
    Ort::SessionOptions so = options(cuda_graph, profile_prefix);
    try {
      return Ort::Session(env, opt.model.c_str(), so);
    } catch (const Ort::Exception& e) {
      const std::string msg = one_line(e.what());
      if (opt.provider == "cuda" && mentions_cuda(msg))
        fail(kNoProvider, opt.model + ": could not create a CUDA session (" + msg + "); use --provider cpu");
      fail(kBadModel, opt.model + ": ONNX Runtime cannot load it (" + msg +
                          "); re-export the model (capsbench export --force)");
    }
  }
};

ModelIO inspect(Ort::Session& session, const std::string& model) {
  ModelIO io;
  if (session.GetInputCount() != 1)
    fail(kBadModel, model + ": the runner feeds models with one input; this one has " +
                        std::to_string(session.GetInputCount()));
  Ort::AllocatorWithDefaultOptions alloc;
  io.input_name = session.GetInputNameAllocated(0, alloc).get();
  auto in_type = session.GetInputTypeInfo(0);
  if (in_type.GetONNXType() != ONNX_TYPE_TENSOR) fail(kBadModel, model + ": the input is not a tensor");
  auto in_info = in_type.GetTensorTypeAndShapeInfo();
  io.input_type = in_info.GetElementType();
  io.input_shape = in_info.GetShape();
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    io.output_names.emplace_back(session.GetOutputNameAllocated(i, alloc).get());
    auto t = session.GetOutputTypeInfo(i);
    if (t.GetONNXType() != ONNX_TYPE_TENSOR)
      fail(kBadModel, model + ": output " + io.output_names.back() + " is not a tensor");
    auto info = t.GetTensorTypeAndShapeInfo();
    io.output_shapes.push_back(info.GetShape());
    io.output_types.push_back(info.GetElementType());
  }
  return io;
}

// Output shapes at `batch` when every non-batch axis is fixed (then fixed buffers can be bound).
bool fixed_output_shapes(const ModelIO& io, int64_t batch, std::vector<std::vector<int64_t>>& out) {
  out.clear();
  for (auto shape : io.output_shapes) {
    if (shape.empty()) return false;
    shape[0] = batch;
    for (size_t k = 1; k < shape.size(); ++k)
      if (shape[k] < 0) return false;
    out.push_back(shape);
  }
  return true;
}

// ----------------------------------------------------------------------------------------------- placement

// The input rows of a batch: rows i % n of `base` for i < batch (capsbench.export.latency.take_batch).
std::vector<uint8_t> take_batch(const cbt::Tensor& base, int64_t batch) {
  const size_t row = base.data.size() / static_cast<size_t>(base.dims[0]);
  std::vector<uint8_t> out(row * static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i)
    std::memcpy(out.data() + i * row, base.data.data() + (i % base.dims[0]) * row, row);
  return out;
}

// The string value of "key" in one event of ONNX Runtime's profile (one JSON object per line), or "".
std::string profile_field(const std::string& line, const std::string& key) {
  const std::string quoted = "\"" + key + "\"";
  for (size_t at = line.find(quoted); at != std::string::npos; at = line.find(quoted, at + 1)) {
    size_t i = at + quoted.size();
    while (i < line.size() && line[i] == ' ') ++i;
    if (i >= line.size() || line[i] != ':') continue;  // the text of a name, not a key
    ++i;
    while (i < line.size() && line[i] == ' ') ++i;
    if (i >= line.size() || line[i] != '"') continue;
    const size_t end = line.find('"', i + 1);
    if (end == std::string::npos) return "";
    return line.substr(i + 1, end - i - 1);
  }
  return "";
}

// provider -> op type -> kernels run: where ONNX Runtime really placed every node (capsbench.export.sessions.
// placement_by_op reads the same profile events in Python). Read off one untimed run of a session of its own
// opened with profiling, so that the timed session pays nothing for it.
using Placement = std::map<std::string, std::map<std::string, int>>;

Placement profile_placement(const Runtime& rt, const cbt::Tensor& base, int64_t batch) {
  const char* tmpdir = std::getenv("TMPDIR");
  std::string dir = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/capsbench-runner-XXXXXX";
  if (mkdtemp(dir.data()) == nullptr) fail(kFailed, "cannot make a temporary folder for ONNX Runtime's profile");
  std::string path;
  Placement out;
  try {
    Ort::Session session = rt.open(false, dir + "/placement");
    Ort::AllocatorWithDefaultOptions alloc;
    const std::string in_name = session.GetInputNameAllocated(0, alloc).get();
    std::vector<std::string> names;
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      names.emplace_back(session.GetOutputNameAllocated(i, alloc).get());
    std::vector<const char*> out_names;
    for (auto& n : names) out_names.push_back(n.c_str());
    std::vector<uint8_t> host = take_batch(base, batch);
    std::vector<int64_t> shape = base.dims;
    shape[0] = batch;
    Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value x = Ort::Value::CreateTensor(cpu, host.data(), host.size(), shape.data(), shape.size(),
                                            static_cast<ONNXTensorElementDataType>(base.dtype));
    const char* in = in_name.c_str();
    session.Run(Ort::RunOptions{nullptr}, &in, &x, 1, out_names.data(), out_names.size());
    path = session.EndProfilingAllocated(alloc).get();
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);  // a session ended by the error may have written its profile
    throw;
  }
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);) {
    if (profile_field(line, "cat") != "Node") continue;
    const std::string name = profile_field(line, "name");
    if (name.size() < 12 || name.compare(name.size() - 12, 12, "_kernel_time") != 0) continue;
    std::string provider = profile_field(line, "provider"), op = profile_field(line, "op_name");
    out[provider.empty() ? "?" : provider][op.empty() ? "?" : op] += 1;
  }
  f.close();
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  return out;
}

// ----------------------------------------------------------------------------------------------- benchmark

// One prepared batch: `run` is one timed call; `outputs` reads the last run's outputs back to the host.
struct Prepared {
  std::function<void()> run;
  std::function<void(std::ofstream&)> write_outputs;
};

void write_value(std::ofstream& f, const Ort::Value& v, const CudaRuntime* cuda) {
  auto info = v.GetTensorTypeAndShapeInfo();
  const auto dtype = static_cast<uint32_t>(info.GetElementType());
  const size_t size = cbt::itemsize(dtype);
  if (size == 0) fail(kFailed, "cannot write an output of ONNX element type " + std::to_string(dtype));
  const size_t bytes = info.GetElementCount() * size;
  const void* data = v.GetTensorRawData();
  std::vector<uint8_t> host;
  if (cuda != nullptr) {
    host.resize(bytes);
    cuda->copy(host.data(), data, bytes, CudaRuntime::kDeviceToHost);
    data = host.data();
  }
  cbt::append_record(f, dtype, info.GetShape(), data, bytes);
}

class Bench {
 public:
  Bench(Ort::Session& session, const ModelIO& io, const Options& opt) : session_(session), io_(io), opt_(opt) {
    for (auto& n : io_.output_names) out_names_.push_back(n.c_str());
  }

  // `host`: the batch's input rows in C order; stays alive until the next prepare().
  Prepared prepare(std::vector<uint8_t>& host, const std::vector<int64_t>& shape) {
    Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    binding_.reset();  // first: it holds references to the values
    values_.clear();
    last_.clear();
    allocator_.reset();  // last: it frees what the values still held
    if (!opt_.io_binding) {
      values_.push_back(
          Ort::Value::CreateTensor(cpu, host.data(), host.size(), shape.data(), shape.size(), io_.input_type));
      const char* in_name = io_.input_name.c_str();
      return {[this, in_name] {
                last_ = session_.Run(Ort::RunOptions{nullptr}, &in_name, &values_[0], 1, out_names_.data(),
                                     out_names_.size());
              },
              [this](std::ofstream& f) {
                for (auto& v : last_) write_value(f, v, nullptr);
              }};
    }

    const bool on_cuda = opt_.provider == "cuda";
    const CudaRuntime* cuda = nullptr;
    Ort::MemoryInfo mem = on_cuda ? Ort::MemoryInfo("Cuda", OrtArenaAllocator, opt_.device_id, OrtMemTypeDefault)
                                  : Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    // The session's own allocator for the bound buffers, on CPU as on CUDA: one ownership path (the values it
    // allocated must die before it), so the CPU test under AddressSanitizer checks the order CUDA relies on.
    allocator_ = std::make_unique<Ort::Allocator>(session_, mem);
    if (on_cuda) {
      cuda_ = CudaRuntime::load();
      cuda = &cuda_;
      values_.push_back(Ort::Value::CreateTensor(*allocator_, shape.data(), shape.size(), io_.input_type));
      cuda_.copy(values_[0].GetTensorMutableRawData(), host.data(), host.size(), CudaRuntime::kHostToDevice);
    } else {
      values_.push_back(
          Ort::Value::CreateTensor(cpu, host.data(), host.size(), shape.data(), shape.size(), io_.input_type));
    }
    binding_ = std::make_unique<Ort::IoBinding>(session_);
    binding_->BindInput(io_.input_name.c_str(), values_[0]);
    std::vector<std::vector<int64_t>> out_shapes;
    if (fixed_output_shapes(io_, shape[0], out_shapes)) {  // fixed buffers, reused by every run
      for (size_t i = 0; i < out_shapes.size(); ++i) {
        values_.push_back(Ort::Value::CreateTensor(*allocator_, out_shapes[i].data(), out_shapes[i].size(),
                                                   io_.output_types[i]));
        binding_->BindOutput(out_names_[i], values_.back());
      }
    } else {
      if (opt_.cuda_graph)
        fail(kBadModel, opt_.model + ": CUDA graphs need fixed output shapes (only axis 0 may be symbolic); "
                                     "re-export the model");
      for (auto* name : out_names_) binding_->BindOutput(name, mem);
    }
    return {[this, on_cuda] {
              session_.Run(Ort::RunOptions{nullptr}, *binding_);
              if (on_cuda) binding_->SynchronizeOutputs();  // count the asynchronous work, as Python's sync does
            },
            [this, cuda](std::ofstream& f) {
              for (auto& v : binding_->GetOutputValues()) write_value(f, v, cuda);
            }};
  }

 private:
  Ort::Session& session_;
  const ModelIO& io_;
  const Options& opt_;
  std::vector<const char*> out_names_;
  // Members are destroyed in reverse order of declaration: the binding first (it refers to the values), then
  // the values (device tensors are freed through the allocator), then the allocator, then the CUDA runtime.
  // Declared the other way round, the allocator died first and the values were freed through a deleted one.
  CudaRuntime cuda_;
  std::unique_ptr<Ort::Allocator> allocator_;
  std::vector<Ort::Value> values_, last_;
  std::unique_ptr<Ort::IoBinding> binding_;
};

// capsbench.export.latency.time_backend: the first call alone, warmup-1 untimed calls, `iters` timed calls.
std::vector<std::pair<std::string, Json>> time_runs(const std::function<void()>& run, const Options& opt,
                                                    int64_t batch) {
  using clock = std::chrono::steady_clock;
  auto call = [&run] {
    const auto t0 = clock::now();
    run();
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  const double first = call();
  double spent = first;
  for (int i = 0; i < opt.warmup - 1; ++i) {
    if (opt.max_seconds > 0 && spent > opt.max_seconds) break;
    spent += call();
  }
  std::vector<double> durations;
  double timed = 0;
  for (int i = 0; i < opt.iters; ++i) {
    durations.push_back(call());
    timed += durations.back();
    if (opt.max_seconds > 0 && static_cast<int>(durations.size()) >= kMinIters && timed > opt.max_seconds) break;
  }
  return samples(durations, batch, first);
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      auto s = line.substr(colon + 1);
      return s.substr(s.find_first_not_of(' '));
    }
  struct utsname u;
  return uname(&u) == 0 ? u.machine : "unknown";
}

std::string element_name(ONNXTensorElementDataType t) { return cbt::dtype_name(static_cast<uint32_t>(t)); }

void write_atomically(const std::string& path, const std::function<void(std::ofstream&)>& body) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail(kFailed, path + ": cannot write");
    body(f);
    f.flush();
    if (!f) fail(kFailed, path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(kFailed, path + ": cannot rename " + tmp);
}

int run(const Options& opt) {
  struct stat st {};
  if (stat(opt.model.c_str(), &st) != 0) fail(kBadModel, opt.model + ": model file not found");
  if (!S_ISREG(st.st_mode)) fail(kBadModel, opt.model + ": not a regular file");

  cbt::Tensor base;
  const bool from_file = !opt.input.empty();
  if (from_file) {
    try {
      base = cbt::read_tensor(opt.input);
    } catch (const cbt::FormatError& e) {
      fail(kBadInput, e.what());
    }
    if (base.dims.empty() || base.dims[0] < 1)
      fail(kBadInput, opt.input + ": shape " + cbt::shape_str(base.dims) + " has no batch rows");
  }

  // The headers' API version: a newer runtime serves it (the C API only grows); an older one cannot.
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    fail(kFailed, std::string("ONNX Runtime ") + OrtGetApiBase()->GetVersionString() +
                      " does not provide API version " + std::to_string(ORT_API_VERSION) +
                      " that the runner was built with; rebuild against its headers");
  Ort::InitApi(api);

  const int threads = opt.threads > 0 ? opt.threads : default_threads();
  Runtime rt(opt, threads);
  Ort::Session session = rt.open(opt.cuda_graph);
  const ModelIO io = inspect(session, opt.model);
  const std::string model_sig = "'" + io.input_name + "' " + cbt::shape_str(io.input_shape) + " " +
                                element_name(io.input_type);

  if (io.input_shape.empty()) fail(kBadModel, opt.model + ": the input is a scalar; it has no batch axis");

  // The input, checked against the model.
  if (from_file) {
    bool ok = base.dims.size() == io.input_shape.size() && base.dtype == static_cast<uint32_t>(io.input_type);
    for (size_t k = 1; ok && k < base.dims.size(); ++k) ok = io.input_shape[k] < 0 || io.input_shape[k] == base.dims[k];
    if (!ok)
      fail(kBadInput, opt.input + ": shape " + cbt::shape_str(base.dims) + " " + cbt::dtype_name(base.dtype) +
                          " does not fit the model's input " + model_sig);
  }
  std::vector<int64_t> batches = opt.batches;
  if (batches.empty()) batches.push_back(from_file ? base.dims[0] : (io.input_shape[0] > 0 ? io.input_shape[0] : 1));
  for (int64_t b : batches)
    if (io.input_shape[0] > 0 && b != io.input_shape[0])
      fail(kBadInput, opt.model + ": the batch axis of input " + model_sig + " is fixed; --batch " + std::to_string(b) +
                          " cannot run (re-export with a dynamic batch axis)");
  if (!from_file) {
    if (io.input_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      fail(kBadInput, opt.model + ": random input is float32 only, the model takes " + model_sig + "; pass --input");
    base.dtype = 1;
    base.dims = io.input_shape;
    base.dims[0] = *std::max_element(batches.begin(), batches.end());
    for (size_t k = 1; k < base.dims.size(); ++k)
      if (base.dims[k] < 0)
        fail(kBadInput, opt.model + ": axis " + std::to_string(k) + " of input " + model_sig +
                            " is symbolic; pass an --input file");
    std::mt19937_64 rng(opt.seed);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    base.data.resize(static_cast<size_t>(base.numel()) * 4);
    auto* x = reinterpret_cast<float*>(base.data.data());
    for (int64_t i = 0; i < base.numel(); ++i) x[i] = uniform(rng);
  }

  const std::string provider = opt.provider == "cuda" ? "CUDAExecutionProvider" : "CPUExecutionProvider";

  // Where ONNX Runtime really placed the nodes (one profiled, untimed run at the first batch size): the requested
  // provider first among those that ran nodes, and a fallback when it ran none (placement_summary in Python judges
  // the compute nodes and Memcpy nodes from the same counts).
  Placement placement;
  std::string placement_error;
  try {
    placement = profile_placement(rt, base, batches[0]);
  } catch (const Ort::Exception& e) {
    placement_error = "OrtException: " + one_line(e.what()).substr(0, 500);
  }
  std::vector<std::string> used;
  if (placement.count(provider)) used.push_back(provider);
  for (auto& kv : placement)
    if (kv.first != provider) used.push_back(kv.first);
  Json fallback = Json::null();
  if (placement_error.empty() && !placement.count(provider)) {
    std::string ran;
    for (auto& p : used) ran += (ran.empty() ? "" : ", ") + p;
    fallback = Json::str("no node ran on " + provider + "; they ran on " + (ran.empty() ? "no provider" : ran));
  }
  std::vector<std::pair<std::string, Json>> by_provider;
  for (auto& [p, ops] : placement) {
    std::vector<std::pair<std::string, Json>> counts;
    for (auto& [op, n] : ops) counts.emplace_back(op, Json::integer(n));
    by_provider.emplace_back(p, Json::object(counts));
  }
  const std::string backend = "ort_cpp_" + std::string(opt.cuda_graph ? "cuda_graph" : opt.provider);
  const Json threads_json = opt.provider == "cuda" ? Json::null() : Json::integer(threads);

  std::vector<Json> rows;
  bool any_failed = false;
  std::unique_ptr<Ort::Session> graph_session;  // CUDA graphs: one session per batch size (a graph has fixed shapes)
  std::unique_ptr<Bench> bench;
  Prepared last;
  std::vector<uint8_t> host;
  for (size_t i = 0; i < batches.size(); ++i) {
    const int64_t b = batches[i];
    std::vector<std::pair<std::string, Json>> row = {{"backend", Json::str(backend)}, {"batch", Json::integer(b)}};
    try {
      bench.reset();  // its buffers come from the session's allocator: gone before the session
      last = {};
      if (opt.cuda_graph && i > 0) {  // a captured graph is for one shape: a fresh session per batch size
        graph_session.reset();
        graph_session = std::make_unique<Ort::Session>(rt.open(true));
      }
      Ort::Session* s = graph_session ? graph_session.get() : &session;
      bench = std::make_unique<Bench>(*s, io, opt);
      host = take_batch(base, b);
      std::vector<int64_t> shape = base.dims;
      shape[0] = b;
      last = bench->prepare(host, shape);
      auto stats = time_runs(last.run, opt, b);
      row.emplace_back("status", Json::str("ok"));
      for (auto& kv : stats)
        if (kv.first != "batch") row.push_back(kv);
    } catch (const Ort::Exception& e) {
      any_failed = true;
      last = {};
      std::cerr << "capsbench-runner: batch " << b << ": " << one_line(e.what()) << "\n";
      row.emplace_back("status", Json::str("error"));
      row.emplace_back("error", Json::str("OrtException: " + one_line(e.what()).substr(0, 500)));
    }
    row.emplace_back("provider", Json::str(provider));
    row.emplace_back("threads", threads_json);
    rows.push_back(Json::object(row));
  }

  if (!opt.output.empty()) {
    if (!last.write_outputs) fail(kFailed, opt.output + ": not written: the last batch size failed");
    write_atomically(opt.output, last.write_outputs);
  }

  struct utsname u {};
  uname(&u);
  double load[1] = {-1};
  std::vector<std::pair<std::string, Json>> input = {
      {"source", Json::str(from_file ? "file" : "random")},
      {"path", from_file ? Json::str(opt.input) : Json::null()},
      {"shape", Json::ints(base.dims)},
      {"dtype", Json::str(cbt::dtype_name(base.dtype))},
  };
  if (!from_file) input.emplace_back("seed", Json::integer(static_cast<long long>(opt.seed)));
  std::vector<std::pair<std::string, Json>> doc = {
      {"schema_version", Json::integer(kSchemaVersion)},
      {"runner", Json::str("capsbench-runner")},
      {"backend", Json::str(backend)},
      {"model", Json::str(opt.model)},
      {"provider", Json::str(provider)},
      {"threads", threads_json},
      {"onnxruntime", Json::str(Ort::GetVersionString())},
      {"session",
       Json::object({{"provider", Json::str(provider)},
                     {"requested", Json::str(opt.provider)},
                     {"providers", opt.provider == "cuda" ? Json::strs({provider, "CPUExecutionProvider"})
                                                          : Json::strs({provider})},
                     {"available_providers", Json::strs(rt.available)},
                     {"providers_used", placement_error.empty() ? Json::strs(used) : Json::null()},
                     {"placement", placement_error.empty() ? Json::object(by_provider) : Json::null()},
                     {"placement_batch", Json::integer(batches[0])},
                     {"placement_error", placement_error.empty() ? Json::null() : Json::str(placement_error)},
                     {"fallback", fallback},
                     {"threads", threads_json},
                     {"opt_level", Json::str(opt.opt_level)},
                     {"io_binding", Json::boolean(opt.io_binding)},
                     {"cuda_graph", Json::boolean(opt.cuda_graph)},
                     {"onnxruntime", Json::str(Ort::GetVersionString())},
                     {"ort_api_version", Json::integer(ORT_API_VERSION)}},
                    2)},
      {"settings", Json::object({{"batch_sizes", Json::ints(batches)},
                                 {"warmup", Json::integer(opt.warmup)},
                                 {"iters", Json::integer(opt.iters)},
                                 {"max_seconds", opt.max_seconds > 0 ? Json::num(opt.max_seconds) : Json::null()},
                                 {"threads", Json::integer(threads)},
                                 {"provider", Json::str(opt.provider)}},
                                2)},
      {"input", Json::object(input, 2)},
      {"input_name", Json::str(io.input_name)},
      {"output_names", Json::strs(io.output_names)},
      {"environment",
       Json::object({{"cpu", Json::str(cpu_model())},
                     {"cpu_cores", Json::integer(default_threads())},
                     {"platform", Json::str(std::string(u.sysname) + "-" + u.release + "-" + u.machine)},
                     {"compiler", Json::str(__VERSION__)},
                     {"onnxruntime", Json::str(Ort::GetVersionString())},
                     {"load_avg_1m", getloadavg(load, 1) == 1 ? Json::num(load[0]) : Json::null()}},
                    2)},
  };
  std::string rows_text = "[";
  for (size_t i = 0; i < rows.size(); ++i) rows_text += (i ? ",\n    " : "\n    ") + rows[i].text;
  doc.emplace_back("rows", Json{rows_text + "\n  ]"});
  const std::string text = Json::object(doc, 0).text + "\n";
  if (opt.json.empty()) std::cout << text << std::flush;
  else write_atomically(opt.json, [&text](std::ofstream& f) { f << text; });
  if (any_failed) {
    std::cerr << "capsbench-runner: some batch sizes failed; their rows have status \"error\"\n";
    return kBatchFailed;
  }
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options opt = parse_args(argc, argv);
    if (opt.help) {
      std::cout << kUsageText;
      return kOk;
    }
    return run(opt);
  } catch (const Fatal& f) {
    std::cerr << "capsbench-runner: " << one_line(f.message) << "\n";
    return f.code;
  } catch (const Ort::Exception& e) {
    std::cerr << "capsbench-runner: ONNX Runtime error: " << one_line(e.what()) << "\n";
    return kFailed;
  } catch (const std::exception& e) {
    std::cerr << "capsbench-runner: " << one_line(e.what()) << "\n";
    return kFailed;
  }
}
