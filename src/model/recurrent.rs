//! The ONNX `LSTM` and `GRU` operators run as one whole-sequence op each.
//!
//! tract 0.23.9 lowers an ONNX `LSTM` to a `Scan` whose body (a matrix product and a fused
//! epilogue) is dispatched as graph nodes once per timestep: on the demo-lstm, 3.5× the time
//! onnxruntime takes for the same file (docs/BENCHMARKS.md, issue 13). Its `GRU` gets a
//! whole-sequence op (`GruSeq`), but row-major, and it packs the recurrent weights again in every
//! fresh plan state, which the daemon makes per call. Here the importer's `LSTM` and `GRU` are
//! replaced by an expansion that wires [`RecurrentSeq`] when the node is the plain forward cell
//! every recurrent model of the toolkit exports (constant weights, default activations, a zero or
//! absent initial state, no peepholes or sequence lengths; for GRU `linear_before_reset`, as
//! PyTorch exports it), and tract's own lowering otherwise. The model contract is untouched: the
//! file is standard ONNX, and the parity tests hold this op to PyTorch and onnxruntime like every
//! other.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::ops::rec::common::{CommonRec, WireBody};
use tract_onnx::ops::rec::{gru::GRU, lstm::LSTM};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ndarray::linalg::general_mat_mul;
use tract_onnx::tract_core::ndarray::{Array2, Array3, ArrayView2, ArrayViewMut2, ShapeBuilder};
use tract_onnx::tract_core::tract_linalg::{element_wise::ElementWise, routines::Func};
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable::{expand, Expansion};
use tract_onnx::tract_hir::ops::{math::tanh, nn::sigmoid};

/// Makes `onnx` import every `LSTM` and `GRU` node through [`Recurrent`].
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert("LSTM", parse_lstm);
    onnx.op_register.insert("GRU", parse_gru);
}

type Parsed = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

fn parse_lstm(_ctx: &ParsingContext, pb: &NodeProto) -> Parsed {
    // tract's own LSTM, kept for what the fused op does not cover.
    let stock = LSTM {
        f: Box::new(sigmoid()),
        g: Box::new(tanh()),
        h: Box::new(tanh()),
    };
    let plain = plain_forward(pb, &["Sigmoid", "Tanh", "Tanh"])?
        && pb.get_attr_opt::<i64>("input_forget")?.unwrap_or(0) == 0;
    recurrent(pb, Box::new(stock), Cell::Lstm, plain)
}

fn parse_gru(_ctx: &ParsingContext, pb: &NodeProto) -> Parsed {
    let linear_before_reset = pb.get_attr_opt::<i64>("linear_before_reset")?.unwrap_or(0) != 0;
    let stock = GRU {
        f: Box::new(sigmoid()),
        g: Box::new(tanh()),
        linear_before_reset,
    };
    let plain = plain_forward(pb, &["Sigmoid", "Tanh"])? && linear_before_reset;
    recurrent(pb, Box::new(stock), Cell::Gru, plain)
}

/// The node's expansion, around tract's own lowering `stock`.
fn recurrent(pb: &NodeProto, stock: Box<dyn WireBody>, cell: Cell, plain: bool) -> Parsed {
    let common = CommonRec::from_node_and_options(pb, 3, 0, stock)?;
    Ok((
        expand(Recurrent {
            common,
            cell,
            plain,
        }),
        vec![],
    ))
}

/// Forward, no clipping, the default activations.
fn plain_forward(pb: &NodeProto, default_activations: &[&str]) -> TractResult<bool> {
    Ok(pb
        .get_attr_opt::<String>("direction")?
        .is_none_or(|d| d == "forward")
        && pb.get_attr_opt::<f32>("clip")?.is_none()
        && pb
            .get_attr_opt_vec::<String>("activations")?
            .is_none_or(|a| a == default_activations))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    /// Gates i, o, f, c (ONNX's order); a cell state.
    Lstm,
    /// Gates z, r, h (ONNX's order), `linear_before_reset`.
    Gru,
}

impl Cell {
    fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Cell::Lstm => "LSTM",
            Cell::Gru => "GRU",
        }
    }
}

/// The importer's view of one ONNX `LSTM` or `GRU` node.
#[derive(Debug, Clone)]
struct Recurrent {
    common: CommonRec,
    cell: Cell,
    /// Attributes the fused op covers (see [`parse_lstm`], [`parse_gru`]).
    plain: bool,
}

impl Recurrent {
    /// The node as one [`RecurrentSeq`], outputs in ONNX's layout; `None` when it is not the
    /// plain case the op covers.
    fn wire_fused(
        &self,
        prefix: &str,
        target: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<Option<TVec<OutletId>>> {
        let c = &self.common;
        if !self.plain
            || c.batch_first
            || c.optional_p_input.is_some()
            || c.optional_sequence_lens_input.is_some()
        {
            return Ok(None);
        }
        // PyTorch exports the zero initial state as zeros shaped like the batch (`ConstantOfShape`:
        // not a constant, but known uniform): fine, anything else is not.
        for slot in [c.optional_initial_h_input, c.optional_initial_c_input]
            .into_iter()
            .flatten()
        {
            let fact = target.outlet_fact(inputs[slot])?;
            let zero = fact
                .konst
                .as_ref()
                .or(fact.uniform.as_ref())
                .is_some_and(|v| {
                    v.to_plain_array_view::<f32>()
                        .is_ok_and(|v| v.iter().all(|x| *x == 0.0))
                });
            if !zero {
                return Ok(None);
            }
        }
        let konst = |ix: usize| -> TractResult<Option<Arc<Tensor>>> {
            Ok(target.outlet_fact(inputs[ix])?.konst.clone())
        };
        let (Some(w), Some(r)) = (konst(1)?, konst(2)?) else {
            return Ok(None);
        };
        let b = match c.optional_bias_input {
            Some(ix) => match konst(ix)? {
                Some(b) => Some(b),
                None => return Ok(None),
            },
            None => None,
        };
        if target.outlet_fact(inputs[0])?.datum_type != f32::datum_type()
            || w.datum_type() != f32::datum_type()
            || r.datum_type() != f32::datum_type()
            || w.rank() != 3
            || r.rank() != 3
            || w.shape()[0] != 1
        {
            return Ok(None);
        }
        let op = RecurrentSeq::new(self.cell, &w, &r, b.as_deref())?;
        let outs = target.wire_node(prefix, op, &[inputs[0]])?;
        // ONNX: Y [T, 1, B, H], Y_h and Y_c [1, B, H]; the op yields them without the direction
        // axis.
        let mut result = tvec!(0.into(); c.nboutputs()?);
        for (slot, out, axis, name) in [
            (c.optional_y_output, 0, 1, "y"),
            (c.optional_y_h_output, 1, 0, "y_h"),
            (c.optional_y_c_output, 2, 0, "y_c"),
        ] {
            if let Some(slot) = slot {
                result[slot] = target.wire_node(
                    format!("{prefix}.{name}"),
                    AxisOp::Add(axis),
                    &[outs[out]],
                )?[0];
            }
        }
        Ok(Some(result))
    }
}

impl Expansion for Recurrent {
    fn name(&self) -> StaticName {
        self.cell.name().into()
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn nboutputs(&self) -> TractResult<usize> {
        self.common.nboutputs()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.common.rules(s, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        target: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        match self.wire_fused(prefix, target, inputs)? {
            Some(outputs) => Ok(outputs),
            None => self.common.wire(prefix, target, inputs),
        }
    }
}

/// A forward LSTM or GRU over a whole sequence from a zero state.
///
/// Input `X` `[T, batch, I]`; outputs `Y` `[T, batch, H]`, `Y_h` `[batch, H]` and, for the LSTM,
/// `Y_c` `[batch, H]`.
///
/// Inside, a step works feature-major: its gates are `[G·H, batch]` = `W · x_tᵀ + R · h_{t-1}ᵀ +
/// bias`, so the sigmoid gates are one contiguous block, the tanh gate another, and the cell
/// update runs over whole `[H, batch]` slices. Per-row calls of the activations cost more than
/// the arithmetic at a hidden size of 32 (the demo-lstm at batch 256: 3.7 ms a call row-major,
/// 2.5 ms feature-major; docs/NOTES.md).
#[derive(Debug, Clone, PartialEq)]
pub struct RecurrentSeq {
    cell: Cell,
    hidden: usize,
    input: usize,
    /// `W`, `[G·H, I]` row-major, as ONNX stores it, and `R`, `[G·H, H]`.
    w: Arc<Vec<f32>>,
    r: Arc<Vec<f32>>,
    /// `Wᵀ` `[I, G·H]` and `Rᵀ` `[H, G·H]`, for a batch of one (see [`matvec_acc`]).
    w_t: Arc<Vec<f32>>,
    r_t: Arc<Vec<f32>>,
    /// The biases added to every step's gates, `[G·H]`: `Wb + Rb` for the LSTM; for the GRU
    /// `Wb` plus `Rb` of the z and r gates.
    bias: Arc<Vec<f32>>,
    /// The GRU's `Rb` of the h gate, `[H]`, which the reset gate scales with `R_h · h`.
    rec_bias: Arc<Vec<f32>>,
}

// The weights are finite constants of one model, so equality is an equivalence here.
impl Eq for RecurrentSeq {}

impl RecurrentSeq {
    /// From ONNX's `W` `[1, G·H, I]`, `R` `[1, G·H, H]` and optional `B` `[1, 2·G·H]`.
    fn new(cell: Cell, w: &Tensor, r: &Tensor, b: Option<&Tensor>) -> TractResult<RecurrentSeq> {
        let (g, input) = (w.shape()[1], w.shape()[2]);
        let hidden = r.shape()[2];
        ensure!(
            hidden > 0 && input > 0 && g == cell.gates() * hidden && r.shape()[1] == g,
            "{} weights of shapes {:?} and {:?}",
            cell.name(),
            w.shape(),
            r.shape()
        );
        let flat = |t: &Tensor, cols: usize, transpose: bool| -> TractResult<Arc<Vec<f32>>> {
            let v = t.to_plain_array_view::<f32>()?;
            let m = v.to_shape((g, cols))?;
            let m = if transpose { m.reversed_axes() } else { m };
            Ok(Arc::new(m.iter().copied().collect()))
        };
        let b: Vec<f32> = match b {
            Some(b) => b.to_plain_array_view::<f32>()?.iter().copied().collect(),
            None => vec![0.0; 2 * g],
        };
        ensure!(
            b.len() == 2 * g,
            "{} bias of {} values for {g} gates",
            cell.name(),
            b.len()
        );
        // The recurrent bias goes with the input's, except the GRU's h gate's.
        let folded = match cell {
            Cell::Lstm => g,
            Cell::Gru => 2 * hidden,
        };
        let bias = (0..g)
            .map(|j| b[j] + if j < folded { b[g + j] } else { 0.0 })
            .collect();
        Ok(RecurrentSeq {
            cell,
            hidden,
            input,
            w: flat(w, input, false)?,
            r: flat(r, hidden, false)?,
            w_t: flat(w, input, true)?,
            r_t: flat(r, hidden, true)?,
            bias: Arc::new(bias),
            rec_bias: Arc::new(b[g + folded..].to_vec()),
        })
    }

    /// `Y` `[T, batch, H]` and the last cell state `[batch, H]` (empty for the GRU).
    ///
    /// The steps run inside [`pulp::Arch::dispatch`], which compiles them (and everything they
    /// inline: the batch-1 products, the cell updates, the transposes) once more for AVX2 and
    /// picks that copy at run time where the CPU has it. The binary itself targets baseline
    /// x86-64, where the same loops are SSE2, 4 wide: the demo-lstm took 67 µs a call at batch 1
    /// and 2.40 ms at 256 that way, 39 µs and 2.26 ms dispatched (before [`activate`];
    /// docs/NOTES.md). Rust does not contract `a * b + c` into FMA, so both copies give the same
    /// sums.
    fn run(&self, x: &[f32], t_len: usize, batch: usize) -> TractResult<(Vec<f32>, Vec<f32>)> {
        pulp::Arch::new().dispatch(Steps {
            op: self,
            x,
            t_len,
            batch,
        })
    }

    /// [`RecurrentSeq::run`]'s body, inlined into each of its dispatched copies.
    #[inline(always)]
    fn steps(&self, x: &[f32], t_len: usize, batch: usize) -> TractResult<(Vec<f32>, Vec<f32>)> {
        let (h, i, g) = (self.hidden, self.input, self.cell.gates() * self.hidden);
        let hb = h * batch;
        if hb == 0 {
            return Ok((vec![], vec![]));
        }
        let (sigmoid_kernel, tanh_kernel) = (Func::Sigmoid.ew_f32()?, Func::Tanh.ew_f32()?);
        let sigmoid = |v: &mut [f32]| activate(v, &*sigmoid_kernel, fast_sigmoid);
        let tanh = |v: &mut [f32]| activate(v, &*tanh_kernel, fast_tanh);
        let mut y = vec![0f32; t_len * hb];
        let mut gates = vec![0f32; g * batch];
        // The GRU's `R · h` is kept apart: the reset gate scales its h-gate rows.
        let mut rec = vec![0f32; if self.cell == Cell::Gru { g * batch } else { 0 }];
        let mut c = vec![0f32; if self.cell == Cell::Lstm { hb } else { 0 }]; // [H, batch]
        let mut h_t = vec![0f32; hb]; // [H, batch]
        for t in 0..t_len {
            for (row, b) in gates.chunks_exact_mut(batch).zip(self.bias.iter()) {
                row.fill(*b);
            }
            // x_t is [batch, I] row-major: as the [I, batch] operand, strides (1, I).
            let x_t = &x[t * batch * i..(t + 1) * batch * i];
            Self::product(&self.w, &self.w_t, i, x_t, (1, i), batch, &mut gates)?;
            // The recurrent product: onto the gates for the LSTM, apart for the GRU, whose reset
            // gate scales its h-gate rows.
            if self.cell == Cell::Gru {
                let (rec_zr, rec_h) = rec.split_at_mut(2 * hb);
                rec_zr.fill(0.0);
                for (row, b) in rec_h.chunks_exact_mut(batch).zip(self.rec_bias.iter()) {
                    row.fill(*b);
                }
            }
            if t > 0 {
                let onto = match self.cell {
                    Cell::Lstm => &mut gates,
                    Cell::Gru => &mut rec,
                };
                Self::product(&self.r, &self.r_t, h, &h_t, (batch, 1), batch, onto)?;
            }
            match self.cell {
                Cell::Lstm => {
                    let (sig, cand) = gates.split_at_mut(3 * hb);
                    sigmoid(sig)?;
                    tanh(cand)?;
                    let (gi, rest) = sig.split_at(hb);
                    let (go, gf) = rest.split_at(hb);
                    for j in 0..hb {
                        c[j] = gf[j] * c[j] + gi[j] * cand[j];
                    }
                    h_t.copy_from_slice(&c);
                    tanh(&mut h_t)?;
                    for (v, o) in h_t.iter_mut().zip(go) {
                        *v *= o;
                    }
                }
                Cell::Gru => {
                    let (zr, cand) = gates.split_at_mut(2 * hb);
                    for (v, r) in zr.iter_mut().zip(&rec) {
                        *v += r;
                    }
                    sigmoid(zr)?;
                    let (z, reset) = zr.split_at(hb);
                    for ((v, r), rh) in cand.iter_mut().zip(reset).zip(&rec[2 * hb..]) {
                        *v += r * rh;
                    }
                    tanh(cand)?;
                    for ((v, n), z) in h_t.iter_mut().zip(cand.iter()).zip(z) {
                        *v = n + z * (*v - n);
                    }
                }
            }
            // Y's step is [batch, H]: the transpose of h_t.
            transpose_into(&h_t, batch, &mut y[t * hb..(t + 1) * hb]);
        }
        let mut c_out = vec![0f32; c.len()];
        transpose_into(&c, batch, &mut c_out);
        Ok((y, c_out))
    }

    /// `c += a · b` for one of this op's weights `a` (`[G·H, k]` row-major, with its transpose
    /// `a_t`) and a `[k, batch]` operand `b` given by its strides.
    #[inline(always)]
    fn product(
        a: &[f32],
        a_t: &[f32],
        k: usize,
        b: &[f32],
        b_strides: (usize, usize),
        batch: usize,
        c: &mut [f32],
    ) -> TractResult<()> {
        match batch {
            0 => Ok(()),
            // One column skips `matrixmultiply`, whose packing of the weights on every call
            // costs more than the arithmetic: the demo-lstm at batch 1 took 103 µs a call through
            // it and 64 µs with SSE2 loops (39 µs with these, dispatched). From two columns on,
            // the packing paid against the SSE2 loops (batch 2: 116 µs through it; batch 4:
            // 130 µs, 208–224 µs with loops); not measured again since.
            1 => {
                matvec_acc(a_t, b, b_strides.0, c);
                Ok(())
            }
            _ => gemm_acc((a.len() / k, k, batch), a, (k, 1), b, b_strides, c),
        }
    }
}

/// A call of [`RecurrentSeq::steps`], for [`pulp::Arch::dispatch`] to compile once per
/// instruction set: a closure is not inlined into the dispatched copies, a `with_simd` is.
struct Steps<'a> {
    op: &'a RecurrentSeq,
    x: &'a [f32],
    t_len: usize,
    batch: usize,
}

impl pulp::WithSimd for Steps<'_> {
    type Output = TractResult<(Vec<f32>, Vec<f32>)>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Self::Output {
        self.op.steps(self.x, self.t_len, self.batch)
    }
}

/// Activations of fewer values than this run inline ([`fast_tanh`]), more through tract's kernel.
const INLINE_ACTIVATION: usize = 256;

/// `tanh` as a rational function (Eigen's `generic_fast_tanh_float`: an odd polynomial of degree
/// 13 over an even one of degree 6 on `[-7.9988, 7.9988]`; off `f32::tanh` by at most 4.2e-7,
/// and the sigmoid below by 2.4e-7, the unit test). Written as plain arithmetic, it vectorises
/// inside [`RecurrentSeq::steps`]: a call of tract's kernel per step and gate cost more than the
/// 32–96 values it computes at batch 1.
#[inline(always)]
fn fast_tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.998_811_7;
    const ALPHA: [f32; 7] = [
        -2.760_768_5e-16,
        2.000_188e-13,
        -8.604_672e-11,
        5.122_297e-8,
        1.485_722_4e-5,
        6.372_619_3e-4,
        4.893_524_6e-3,
    ];
    const BETA: [f32; 4] = [1.198_258_4e-6, 1.185_347_1e-4, 2.268_434_6e-3, 4.893_525e-3];
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let p = ALPHA.iter().fold(0.0, |p, a| p * x2 + a) * x;
    let q = BETA.iter().fold(0.0, |q, b| q * x2 + b);
    p / q
}

/// `σ(x) = (1 + tanh(x / 2)) / 2`.
#[inline(always)]
fn fast_sigmoid(x: f32) -> f32 {
    0.5 + 0.5 * fast_tanh(0.5 * x)
}

/// Applies an activation to `v`: inline as `f` below [`INLINE_ACTIVATION`] values (batch 1),
/// through tract's `kernel` (AVX-512 where the CPU has it) above. The demo-lstm took 36.7 µs a
/// call at batch 1 and 2.60 ms at 256 all inline, 38.2 µs and 2.19 ms all through the kernels.
#[inline(always)]
fn activate(
    v: &mut [f32],
    kernel: &dyn ElementWise<f32>,
    f: impl Fn(f32) -> f32,
) -> TractResult<()> {
    if v.len() < INLINE_ACTIVATION {
        for x in v {
            *x = f(*x);
        }
        Ok(())
    } else {
        kernel.run(v)
    }
}

/// `to[b * rows + j] = from[j * batch + b]`: `[rows, batch]` to `[batch, rows]`. Written in
/// order and read across: strided writes to `to` cost 6 % of a demo-lstm replay (perf).
#[inline(always)]
fn transpose_into(from: &[f32], batch: usize, to: &mut [f32]) {
    let rows = from.len() / batch.max(1);
    if rows == 0 {
        return;
    }
    for (b, out) in to.chunks_exact_mut(rows).enumerate() {
        for (j, v) in out.iter_mut().enumerate() {
            *v = from[j * batch + b];
        }
    }
}

/// `c += a · b` for one column `b` (`k` values `b_stride` apart), from `a_t` = `aᵀ` `[k, m]`
/// row-major: a multiply-add of a whole row of `a_t` onto `c` per value of `b`, over contiguous
/// slices, which vectorise at any width. (Sums held in registers across `k`, a `[f32; 32]` per
/// block of rows, vectorised on their own but were spilled to the stack, scalar, once inlined
/// into [`RecurrentSeq::steps`]: 119 µs a call against 67.)
#[inline(always)]
pub(super) fn matvec_acc(a_t: &[f32], b: &[f32], b_stride: usize, c: &mut [f32]) {
    let m = c.len();
    for (row, kk) in a_t.chunks_exact(m).zip(0..) {
        let v = b[kk * b_stride];
        for (s, a) in c.iter_mut().zip(row) {
            *s += v * a;
        }
    }
}

/// `c += a · b`, `c` `[m, n]` row-major, `a` `[m, k]` and `b` `[k, n]` given by their strides
/// (row, column): ndarray hands f32 matrices to `matrixmultiply`'s sgemm, which packs any
/// strides and picks its AVX2/FMA/AVX-512 kernel at run time.
pub(super) fn gemm_acc(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    c: &mut [f32],
) -> TractResult<()> {
    let a = ArrayView2::from_shape((m, k).strides(a_strides), a)?;
    let b = ArrayView2::from_shape((k, n).strides(b_strides), b)?;
    let mut c = ArrayViewMut2::from_shape((m, n), &mut c[..m * n])?;
    general_mat_mul(1.0, &a, &b, 1.0, &mut c);
    Ok(())
}

impl Op for RecurrentSeq {
    fn name(&self) -> StaticName {
        format!("{}Seq", self.cell.name()).into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("hidden={} input={}", self.hidden, self.input)])
    }

    op_as_typed_op!();
}

impl EvalOp for RecurrentSeq {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let &[t_len, batch, i] = x.shape() else {
            bail!(
                "{}Seq expects X of rank 3, got {:?}",
                self.cell.name(),
                x.shape()
            );
        };
        ensure!(
            i == self.input,
            "{}Seq expects {} input features, got {i}",
            self.cell.name(),
            self.input
        );
        ensure!(
            t_len > 0,
            "{}Seq needs at least one timestep",
            self.cell.name()
        );
        let x = x.as_standard_layout();
        let x = x.as_slice().context("X not contiguous")?;
        let (y, c) = self.run(x, t_len, batch)?;
        let h = self.hidden;
        let y_h = y[(t_len - 1) * batch * h..].to_vec();
        let mut outputs = tvec!(
            Array3::from_shape_vec((t_len, batch, h), y)?.into_tvalue(),
            Array2::from_shape_vec((batch, h), y_h)?.into_tvalue(),
        );
        if self.cell == Cell::Lstm {
            outputs.push(Array2::from_shape_vec((batch, h), c)?.into_tvalue());
        }
        Ok(outputs)
    }
}

impl TypedOp for RecurrentSeq {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(
            x.rank() == 3,
            "{}Seq expects X of rank 3, got {x:?}",
            self.cell.name()
        );
        let (t, b, h) = (x.shape[0].clone(), x.shape[1].clone(), self.hidden.to_dim());
        let mut facts = tvec!(
            f32::fact([t, b.clone(), h.clone()]),
            f32::fact([b.clone(), h.clone()])
        );
        if self.cell == Cell::Lstm {
            facts.push(f32::fact([b, h]));
        }
        Ok(facts)
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    struct Case {
        cell: Cell,
        hidden: usize,
        input: usize,
        t_len: usize,
        batch: usize,
        x: Vec<f32>,
        w: Vec<f32>,
        r: Vec<f32>,
        b: Vec<f32>,
    }

    /// The cell as ONNX defines it (GRU with `linear_before_reset`), one scalar at a time: `Y`
    /// `[T, batch, H]` and the last cell state `[batch, H]` (zeros for the GRU).
    fn reference(k: &Case) -> (Vec<f32>, Vec<f32>) {
        let (h, i, batch) = (k.hidden, k.input, k.batch);
        let g = k.cell.gates() * h;
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (mut hs, mut cs) = (vec![0f32; batch * h], vec![0f32; batch * h]);
        let mut y = vec![];
        for t in 0..k.t_len {
            let mut next = vec![0f32; batch * h];
            for b in 0..batch {
                // (W x + Wb, R h + Rb) of gate `gate`, unit `j`
                let pre = |gate: usize, j: usize| {
                    let row = gate * h + j;
                    let mut wx = k.b[row];
                    for n in 0..i {
                        wx += k.w[row * i + n] * k.x[(t * batch + b) * i + n];
                    }
                    let mut rh = k.b[g + row];
                    for n in 0..h {
                        rh += k.r[row * h + n] * hs[b * h + n];
                    }
                    (wx, rh)
                };
                let both = |gate: usize, j: usize| {
                    let (wx, rh) = pre(gate, j);
                    wx + rh
                };
                for j in 0..h {
                    next[b * h + j] = match k.cell {
                        Cell::Lstm => {
                            let (gi, go, gf) = (sig(both(0, j)), sig(both(1, j)), sig(both(2, j)));
                            let c = gf * cs[b * h + j] + gi * both(3, j).tanh();
                            cs[b * h + j] = c;
                            go * c.tanh()
                        }
                        Cell::Gru => {
                            let (z, r) = (sig(both(0, j)), sig(both(1, j)));
                            let (wx, rh) = pre(2, j);
                            let n = (wx + r * rh).tanh();
                            (1.0 - z) * n + z * hs[b * h + j]
                        }
                    };
                }
            }
            hs = next;
            y.extend_from_slice(&hs);
        }
        (y, cs)
    }

    #[test]
    fn the_activations_are_within_a_few_ulps_of_the_library_functions() {
        let (mut tanh_err, mut sigmoid_err) = (0f32, 0f32);
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            tanh_err = tanh_err.max((fast_tanh(x) - x.tanh()).abs());
            sigmoid_err = sigmoid_err.max((fast_sigmoid(x) - 1.0 / (1.0 + (-x).exp())).abs());
        }
        assert!(tanh_err < 5e-7, "tanh off by {tanh_err}");
        assert!(sigmoid_err < 5e-7, "sigmoid off by {sigmoid_err}");
        eprintln!("tanh off by at most {tanh_err:e}, sigmoid {sigmoid_err:e}");
        assert!((fast_tanh(f32::INFINITY) - 1.0).abs() < 5e-7);
        assert!((fast_tanh(f32::NEG_INFINITY) + 1.0).abs() < 5e-7);
    }

    #[test]
    fn the_whole_sequence_op_is_the_onnx_cell_on_both_paths() {
        let mut rng = SmallRng::seed_from_u64(7);
        // Batch 1 takes the matrix-vector loops, the others matrixmultiply; hidden sizes that
        // are and are not multiples of the vector widths.
        let shapes = [
            (32, 5, 16, 1),
            (32, 5, 16, 9),
            (7, 3, 5, 1),
            (7, 3, 5, 4),
            (20, 1, 3, 300),
        ];
        for cell in [Cell::Lstm, Cell::Gru] {
            for (hidden, input, t_len, batch) in shapes {
                let g = cell.gates() * hidden;
                let mut draw = |n: usize| -> Vec<f32> {
                    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
                };
                let k = Case {
                    cell,
                    hidden,
                    input,
                    t_len,
                    batch,
                    x: draw(t_len * batch * input),
                    w: draw(g * input),
                    r: draw(g * hidden),
                    b: draw(2 * g),
                };
                let tensor = |v: &[f32], shape: &[usize]| Tensor::from_shape(shape, v).unwrap();
                let op = RecurrentSeq::new(
                    cell,
                    &tensor(&k.w, &[1, g, input]),
                    &tensor(&k.r, &[1, g, hidden]),
                    Some(&tensor(&k.b, &[1, 2 * g])),
                )
                .unwrap();
                let x = tensor(&k.x, &[t_len, batch, input]).into_tvalue();
                let out = op.eval(&EvalContext::out_of_plan(), tvec!(x)).unwrap();
                let (want_y, want_c) = reference(&k);
                let got = |ix: usize| -> Vec<f32> {
                    out[ix]
                        .to_plain_array_view::<f32>()
                        .unwrap()
                        .iter()
                        .copied()
                        .collect()
                };
                let worst = |a: &[f32], b: &[f32]| {
                    a.iter()
                        .zip(b)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max)
                };
                let case = format!(
                    "{cell:?}, hidden {hidden}, input {input}, {t_len} steps, batch {batch}"
                );
                assert_eq!(out.len(), if cell == Cell::Lstm { 3 } else { 2 }, "{case}");
                assert_eq!(out[0].shape(), [t_len, batch, hidden], "{case}");
                let y = got(0);
                assert!(
                    worst(&y, &want_y) < 1e-5,
                    "Y off by {} ({case})",
                    worst(&y, &want_y)
                );
                assert_eq!(
                    got(1),
                    y[(t_len - 1) * batch * hidden..],
                    "Y_h is Y's last step ({case})"
                );
                if cell == Cell::Lstm {
                    let c = got(2);
                    assert!(
                        worst(&c, &want_c) < 1e-5,
                        "Y_c off by {} ({case})",
                        worst(&c, &want_c)
                    );
                }
            }
        }
    }
}
