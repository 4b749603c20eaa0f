// nst_host: run the style-transfer optimisation in C++ from an `nst export` directory.
//
//   nst_host EXPORT_DIR TARGETS.pt OUT.ppm [--steps N] [--lr X] [--print-every N] [--losses FILE]
//            [--device cpu|cuda]
//
// EXPORT_DIR holds manifest.json and extractor.ts (`nst export`); TARGETS.pt holds the
// content features, style Grams, start image and loss settings (`nst targets`). The loop
// is the Python engine's reference path: float32, NCHW, Adam, the same losses:
//
//   gram(F)  = F F^T / (C*M)                 F: (C, M = H*W)
//   content  = sum_l a_l mean((F_l - P_l)^2)
//   style    = sum_l b_l mean((gram(F_l) - A_l)^2)
//   tv       = mean((x[i+1,j]-x[i,j])^2) + mean((x[i,j+1]-x[i,j])^2)
//   total    = w_c content + w_s style + w_tv tv
//
// On CUDA the float32 convolutions and matmuls run as IEEE float32, as the Python engine's
// fp32 path does: libtorch would otherwise run cuDNN convolutions in TF32.
//
// Errors print one line, "nst_host: error: ...", and exit 1.

#include <ATen/Context.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "json.hpp"

namespace {

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string first_line(const std::string& text) {
  auto pos = text.find('\n');
  return pos == std::string::npos ? text : text.substr(0, pos);
}

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UserError(what + " not found or unreadable: " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct Layer {
  std::string name;
  double weight;
  int64_t index;  // position in the extractor's output tuple
};

struct Setup {
  std::vector<std::string> taps;  // the extractor's outputs, in order (from the manifest)
  std::string ts_file, ts_sha256;
  int64_t min_side = 1;
  std::vector<Layer> content_layers, style_layers;
  std::vector<torch::Tensor> content, grams;
  torch::Tensor init;
  double wc = 1, ws = 1, wtv = 0, lr = 0.02;
  torch::Device device = torch::kCPU;
};

torch::Device pick_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name != "cuda") throw UserError("unknown --device " + name + "; use cpu or cuda");
  if (!torch::cuda::is_available())
    throw UserError("--device cuda: no CUDA GPU is available to this nst_host (no GPU, or it was built without "
                    "libtorch_cuda: see examples/cpp/CMakeLists.txt)");
  // IEEE float32 for cuDNN convolutions and cuBLAS matmuls (the per-backend settings of
  // libtorch >= 2.9; the legacy allow-TF32 flags must not be mixed with them).
  auto& ctx = at::globalContext();
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, at::Float32Precision::IEEE);
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  return torch::Device(torch::kCUDA);
}

int64_t tap_index(const std::vector<std::string>& taps, const std::string& name, const std::string& where) {
  for (size_t i = 0; i < taps.size(); ++i)
    if (taps[i] == name) return static_cast<int64_t>(i);
  std::string have;
  for (auto& t : taps) have += (have.empty() ? "" : ", ") + t;
  throw UserError(where + " needs layer " + name + ", which the exported extractor does not output (it has " + have +
                  "); re-export with --taps including it");
}

void read_manifest(const std::string& dir, Setup& s) {
  std::string text = read_file(dir + "/manifest.json", "manifest.json of the export directory");
  try {
    auto m = mini_json::parse(text);
    if (m.at("format").string() != "nst-extractor") throw UserError(dir + "/manifest.json is not an nst manifest");
    for (auto& t : m.at("taps").array()) s.taps.push_back(t.string());
    const auto& input = m.at("input");
    s.min_side = static_cast<int64_t>(input.at("min_side").number());
    const auto& range = input.at("value_range").array();
    if (range.size() != 2 || range[0].number() != 0.0 || range[1].number() != 1.0)
      throw UserError("the manifest's input range is not [0, 1]; this host feeds [0, 1] RGB");
    if (input.at("layout").string() != "NCHW") throw UserError("the manifest's input layout is not NCHW");
    const auto& ts = m.at("artefacts").at("torchscript");
    s.ts_file = dir + "/" + ts.at("file").string();
    s.ts_sha256 = ts.at("sha256").string();
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& e) {
    throw UserError(dir + "/manifest.json: " + first_line(e.what()));
  }
}

void read_targets(const std::string& path, Setup& s) {
  torch::jit::ExtraFilesMap extra{{"nst_targets.json", ""}};
  torch::jit::Module t;
  {
    std::ifstream probe(path);
    if (!probe) throw UserError("targets file not found or unreadable: " + path);
  }
  try {
    t = torch::jit::load(path, s.device, extra);
  } catch (const std::exception& e) {
    throw UserError("cannot load targets file " + path + ": " + first_line(e.what()));
  }
  if (extra["nst_targets.json"].empty()) throw UserError(path + " is not an nst targets file (no nst_targets.json)");
  try {
    auto j = mini_json::parse(extra["nst_targets.json"]);
    if (j.at("format").string() != "nst-targets") throw UserError(path + " is not an nst targets file");
    if (j.at("extractor_sha256").string() != s.ts_sha256)
      throw UserError(path + " was made for another extractor (its extractor_sha256 differs from the manifest's); "
                      "run `nst targets` with this export directory");
    auto layers = [&](const char* key, std::vector<Layer>& out) {
      for (auto& item : j.at(key).array()) {
        const auto& pair = item.array();
        std::string name = pair.at(0).string();
        out.push_back({name, pair.at(1).number(), tap_index(s.taps, name, path)});
      }
    };
    layers("content_layers", s.content_layers);
    layers("style_layers", s.style_layers);
    s.wc = j.at("content_weight").number();
    s.ws = j.at("style_weight").number();
    s.wtv = j.at("tv_weight").number();
    s.lr = j.at("lr").number();
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& e) {
    throw UserError(path + ": " + first_line(e.what()));
  }
  try {
    for (size_t i = 0; i < s.content_layers.size(); ++i)
      s.content.push_back(t.attr("content_" + std::to_string(i)).toTensor().to(s.device, torch::kFloat32));
    for (size_t i = 0; i < s.style_layers.size(); ++i)
      s.grams.push_back(t.attr("gram_" + std::to_string(i)).toTensor().to(s.device, torch::kFloat32).squeeze(0));
    s.init = t.attr("init").toTensor().to(s.device, torch::kFloat32).contiguous();
  } catch (const std::exception& e) {
    throw UserError(path + " lacks a tensor: " + first_line(e.what()));
  }
  if (s.init.dim() != 4 || s.init.size(0) != 1 || s.init.size(1) != 3)
    throw UserError(path + ": the start image must have shape (1, 3, H, W)");
  if (std::min(s.init.size(2), s.init.size(3)) < s.min_side)
    throw UserError(path + ": the image is smaller than the extractor's minimum side " + std::to_string(s.min_side));
}

// The TorchScript file carries its own description (nst.json): an edited manifest (taps
// swapped, say) would make the losses read the wrong layers, so it must agree.
void check_embedded(const std::string& text, const Setup& s) {
  if (text.empty()) throw UserError(s.ts_file + " carries no description of itself (nst.json): re-export it");
  std::vector<std::string> inside;
  int64_t min_side = 0;
  try {
    auto j = mini_json::parse(text);
    for (auto& t : j.at("taps").array()) inside.push_back(t.string());
    min_side = static_cast<int64_t>(j.at("min_side").number());
  } catch (const std::exception& e) {
    throw UserError(s.ts_file + ": its embedded description is unreadable (" + first_line(e.what()) + "); re-export it");
  }
  if (inside != s.taps || min_side != s.min_side)
    throw UserError("manifest.json does not match " + s.ts_file + ": its taps or min_side differ from the file's "
                    "(the manifest was edited); re-export");
}

torch::Tensor gram(const torch::Tensor& f) {  // f: (1, C, H, W) -> (C, C)
  auto c = f.size(1), m = f.size(2) * f.size(3);
  auto fm = f.reshape({c, m});
  return torch::mm(fm, fm.t()) / static_cast<double>(c * m);
}

void write_ppm(const torch::Tensor& x, const std::string& path) {
  // x: (1, 3, H, W) in [0, 1] -> binary PPM (P6), 8 bits, written to a temporary name first.
  auto img = (x.detach().cpu().clamp(0, 1) * 255.0).round().to(torch::kUInt8)[0].permute({1, 2, 0}).contiguous();
  std::string tmp = path + ".partial";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw UserError("cannot write " + path);
    f << "P6\n" << img.size(1) << " " << img.size(0) << "\n255\n";
    f.write(reinterpret_cast<const char*>(img.data_ptr<uint8_t>()), img.numel());
    if (!f) throw UserError("cannot write " + path);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw UserError("cannot rename " + tmp + " to " + path);
}

int run(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: nst_host EXPORT_DIR TARGETS.pt OUT.ppm [--steps N] [--lr X] [--print-every N] "
                 "[--losses FILE] [--device cpu|cuda]\n";
    return 2;
  }
  std::string dir = argv[1], targets = argv[2], out = argv[3], losses_path, device = "cpu";
  int64_t steps = 100, every = 10;
  double lr_override = -1;
  for (int i = 4; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) throw UserError("option " + a + " needs a value");
    std::string v = argv[++i];
    try {
      if (a == "--steps") steps = std::stoll(v);
      else if (a == "--lr") lr_override = std::stod(v);
      else if (a == "--print-every") every = std::stoll(v);
      else if (a == "--losses") losses_path = v;
      else if (a == "--device") device = v;
      else throw UserError("unknown option " + a);
    } catch (const std::invalid_argument&) {
      throw UserError("bad value for " + a + ": " + v);
    }
  }
  if (steps < 1 || every < 1) throw UserError("--steps and --print-every must be at least 1");
  if (out.size() < 4 || out.substr(out.size() - 4) != ".ppm") throw UserError("the output must be a .ppm file");

  Setup s;
  s.device = pick_device(device);
  read_manifest(dir, s);
  torch::jit::Module net;
  {
    std::ifstream probe(s.ts_file);
    if (!probe) throw UserError("TorchScript file not found: " + s.ts_file);
  }
  torch::jit::ExtraFilesMap ts_extra{{"nst.json", ""}};
  try {
    net = torch::jit::load(s.ts_file, s.device, ts_extra);
  } catch (const std::exception& e) {
    throw UserError("cannot load TorchScript file " + s.ts_file + ": " + first_line(e.what()));
  }
  check_embedded(ts_extra["nst.json"], s);
  net.eval();
  read_targets(targets, s);
  double lr = lr_override > 0 ? lr_override : s.lr;

  auto x = s.init.clone().set_requires_grad(true);  // (1, 3, H, W) float32: the only thing optimised
  torch::optim::Adam opt({x}, torch::optim::AdamOptions(lr));
  std::ofstream losses;
  if (!losses_path.empty()) {
    losses.open(losses_path);
    if (!losses) throw UserError("cannot write " + losses_path);
    losses.precision(17);
  }
  std::printf("nst_host: %lld steps on a %lldx%lld image (WxH) on %s, Adam lr %g, %zu content and %zu style layers\n",
              static_cast<long long>(steps), static_cast<long long>(x.size(3)), static_cast<long long>(x.size(2)),
              device.c_str(), lr, s.content_layers.size(), s.style_layers.size());
  for (int64_t step = 0; step < steps; ++step) {
    opt.zero_grad();
    auto outputs = net.forward({x});
    if (!outputs.isTuple()) throw UserError("the extractor did not return a tuple");
    auto feats = outputs.toTuple()->elements();
    if (feats.size() != s.taps.size())
      throw UserError("the extractor returned " + std::to_string(feats.size()) + " outputs; the manifest lists " +
                      std::to_string(s.taps.size()) + " taps");
    auto zero = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).device(s.device));
    auto content = zero, style = zero;
    for (size_t i = 0; i < s.content_layers.size(); ++i) {
      auto f = feats[s.content_layers[i].index].toTensor();
      content = content + s.content_layers[i].weight * (f - s.content[i]).pow(2).mean();
    }
    for (size_t i = 0; i < s.style_layers.size(); ++i) {
      auto f = feats[s.style_layers[i].index].toTensor();
      style = style + s.style_layers[i].weight * (gram(f) - s.grams[i]).pow(2).mean();
    }
    using torch::indexing::Slice;
    auto dh = (x.index({Slice(), Slice(), Slice(1, torch::indexing::None), Slice()}) -
               x.index({Slice(), Slice(), Slice(torch::indexing::None, -1), Slice()})).pow(2).mean();
    auto dw = (x.index({Slice(), Slice(), Slice(), Slice(1, torch::indexing::None)}) -
               x.index({Slice(), Slice(), Slice(), Slice(torch::indexing::None, -1)})).pow(2).mean();
    auto tv = dh + dw;
    auto total = s.wc * content + s.ws * style + s.wtv * tv;
    total.backward();
    opt.step();
    {
      torch::NoGradGuard guard;
      x.clamp_(0.0, 1.0);
    }
    double t = total.item<double>(), c = content.item<double>(), st = style.item<double>(), v = tv.item<double>();
    if (!std::isfinite(t)) throw UserError("the loss became NaN or Inf at step " + std::to_string(step + 1) +
                                           "; try a lower --lr");
    if (losses.is_open()) losses << t << " " << c << " " << st << " " << v << "\n";
    if ((step + 1) % every == 0 || step == 0 || step + 1 == steps)
      std::printf("step %lld/%lld loss %.6g (content %.4g style %.4g tv %.4g)\n", static_cast<long long>(step + 1),
                  static_cast<long long>(steps), t, c, st, v);
  }
  write_ppm(x, out);
  std::printf("nst_host: wrote %s\n", out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UserError& e) {
    std::cerr << "nst_host: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "nst_host: error: " << first_line(e.what()) << std::endl;
    return 1;
  }
}
