//! Adapter states and updates as `dict[str, numpy.ndarray]` (float32).
//!
//! Keys: `<module>.a` (r × d_in), `<module>.b` (d_out × r),
//! `<module>.base_delta` (d_out × d_in, FLoRA and FedEx-LoRA once merged)
//! and `head` (the trainable classifier, flattened weight then bias), where
//! `<module>` is the adapted module's name, e.g. `layer.0.query`. Arrays
//! that Rust hands over (an update) move into numpy without a copy; arrays
//! read from Python are copied once into the state Rust owns.

use fedsvd::{ClientUpdate, GlobalState, ModuleAdapter};
use ndarray::{Array2, Ix2};
use numpy::{PyArray1, PyArray2, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::{Error, Result};

fn key(module: &str, part: &str) -> String {
    format!("{module}.{part}")
}

/// A copy of `state` as a dict of float32 arrays.
pub fn state_to_dict<'py>(py: Python<'py>, state: &GlobalState) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for m in &state.modules {
        dict.set_item(
            key(&m.name, "a"),
            PyArray2::from_owned_array(py, m.a.clone()),
        )?;
        dict.set_item(
            key(&m.name, "b"),
            PyArray2::from_owned_array(py, m.b.clone()),
        )?;
        if let Some(delta) = &m.base_delta {
            dict.set_item(
                key(&m.name, "base_delta"),
                PyArray2::from_owned_array(py, delta.clone()),
            )?;
        }
    }
    if let Some(head) = &state.head {
        dict.set_item("head", PyArray1::from_vec(py, head.clone()))?;
    }
    Ok(dict)
}

/// An update as a dict of float32 arrays; the arrays move into numpy.
pub fn update_to_dict<'py>(
    py: Python<'py>,
    state: &GlobalState,
    update: ClientUpdate,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (m, b) in state.modules.iter().zip(update.b) {
        dict.set_item(key(&m.name, "b"), PyArray2::from_owned_array(py, b))?;
    }
    if let Some(a) = update.a {
        for (m, a) in state.modules.iter().zip(a) {
            dict.set_item(key(&m.name, "a"), PyArray2::from_owned_array(py, a))?;
        }
    }
    if let Some(head) = update.head {
        dict.set_item("head", PyArray1::from_vec(py, head))?;
    }
    Ok(dict)
}

/// Reads a float32 matrix of the given shape from `dict[name]`.
fn matrix(
    dict: &Bound<'_, PyDict>,
    name: &str,
    shape: (usize, usize),
    what: &str,
) -> Result<Option<Array2<f32>>> {
    let Some(value) = dict
        .get_item(name)
        .map_err(|e| Error::argument(what, e.to_string()))?
    else {
        return Ok(None);
    };
    let array: PyReadonlyArrayDyn<'_, f32> = value.extract().map_err(|_| {
        Error::argument(
            format!("{what}[{name:?}]"),
            "must be a numpy array of dtype float32",
        )
    })?;
    let view = array.as_array();
    let dims = view.shape().to_vec();
    let view = view.into_dimensionality::<Ix2>().map_err(|_| {
        Error::argument(
            format!("{what}[{name:?}]"),
            format!("must be a matrix of shape {shape:?}, got shape {dims:?}"),
        )
    })?;
    if view.dim() != shape {
        return Err(Error::argument(
            format!("{what}[{name:?}]"),
            format!("must have shape {shape:?}, got {:?}", view.dim()),
        ));
    }
    Ok(Some(view.to_owned()))
}

fn vector(
    dict: &Bound<'_, PyDict>,
    name: &str,
    len: usize,
    what: &str,
) -> Result<Option<Vec<f32>>> {
    let Some(value) = dict
        .get_item(name)
        .map_err(|e| Error::argument(what, e.to_string()))?
    else {
        return Ok(None);
    };
    let array: PyReadonlyArrayDyn<'_, f32> = value.extract().map_err(|_| {
        Error::argument(
            format!("{what}[{name:?}]"),
            "must be a numpy array of dtype float32",
        )
    })?;
    let view = array.as_array();
    if view.len() != len || view.ndim() != 1 {
        return Err(Error::argument(
            format!("{what}[{name:?}]"),
            format!("must have shape ({len},), got {:?}", view.shape()),
        ));
    }
    Ok(Some(view.iter().copied().collect()))
}

fn missing(what: &str, name: &str) -> Error {
    Error::argument(what, format!("has no array {name:?}"))
}

/// Refuses keys that are not among `known`, naming the first.
fn check_keys(dict: &Bound<'_, PyDict>, known: &[String], what: &str) -> Result<()> {
    for k in dict.keys() {
        let name: String = k
            .extract()
            .map_err(|_| Error::argument(what, "keys must be strings"))?;
        if !known.contains(&name) {
            return Err(Error::argument(
                what,
                format!("unexpected array {name:?} (known: {})", known.join(", ")),
            ));
        }
    }
    Ok(())
}

/// A global state read from a dict, shaped like `template` (the modules,
/// their shapes and whether the head trains come from the template).
pub fn dict_to_state(dict: &Bound<'_, PyDict>, template: &GlobalState) -> Result<GlobalState> {
    let what = "global_state";
    let mut known = Vec::new();
    let mut modules = Vec::with_capacity(template.modules.len());
    for m in &template.modules {
        let (a_name, b_name, d_name) = (
            key(&m.name, "a"),
            key(&m.name, "b"),
            key(&m.name, "base_delta"),
        );
        let a = matrix(dict, &a_name, m.a.dim(), what)?.ok_or_else(|| missing(what, &a_name))?;
        let b = matrix(dict, &b_name, m.b.dim(), what)?.ok_or_else(|| missing(what, &b_name))?;
        let base_delta = matrix(dict, &d_name, (m.d_out(), m.d_in()), what)?;
        known.extend([a_name, b_name, d_name]);
        modules.push(ModuleAdapter {
            name: m.name.clone(),
            a,
            b,
            base_delta,
        });
    }
    let head = match &template.head {
        Some(h) => Some(vector(dict, "head", h.len(), what)?.ok_or_else(|| missing(what, "head"))?),
        None => None,
    };
    known.push("head".into());
    check_keys(dict, &known, what)?;
    Ok(GlobalState {
        modules,
        scale: template.scale,
        head,
    })
}

/// A client's update read from a dict: `B` of every module, `A` when the
/// method trains it, the head when it trains.
pub fn dict_to_update(
    dict: &Bound<'_, PyDict>,
    examples: usize,
    state: &GlobalState,
    trains_a: bool,
) -> Result<ClientUpdate> {
    let what = "update";
    let mut known = Vec::new();
    let mut b = Vec::with_capacity(state.modules.len());
    let mut a = Vec::with_capacity(state.modules.len());
    for m in &state.modules {
        let b_name = key(&m.name, "b");
        b.push(matrix(dict, &b_name, m.b.dim(), what)?.ok_or_else(|| missing(what, &b_name))?);
        known.push(b_name);
        if trains_a {
            let a_name = key(&m.name, "a");
            a.push(matrix(dict, &a_name, m.a.dim(), what)?.ok_or_else(|| missing(what, &a_name))?);
            known.push(a_name);
        }
    }
    let head = match &state.head {
        Some(h) => Some(vector(dict, "head", h.len(), what)?.ok_or_else(|| missing(what, "head"))?),
        None => None,
    };
    known.push("head".into());
    check_keys(dict, &known, what)?;
    Ok(ClientUpdate {
        examples,
        b,
        a: trains_a.then_some(a),
        head,
    })
}
