//! The [`Bus`] over the system bus with zbus: systemd's manager for unit properties,
//! slices and transient scopes, logind for new users. Only the calls the driver makes are
//! declared here (zbus's proxy macro generates the blocking proxies); systemd's D-Bus API
//! is documented in org.freedesktop.systemd1(5) and org.freedesktop.login1(5).

use std::sync::Arc;

use zbus::{
    blocking::Connection,
    zvariant::{OwnedObjectPath, Value},
};

use super::{Bus, Property, SystemdError};

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_async = false,
    blocking_name = "ManagerProxy"
)]
trait Manager {
    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, Value<'_>)],
    ) -> zbus::Result<()>;

    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, Vec<(&str, Value<'_>)>)],
    ) -> zbus::Result<OwnedObjectPath>;

    fn get_unit_by_control_group(&self, cgroup: &str) -> zbus::Result<OwnedObjectPath>;

    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
}

/// The interface that carries a unit type's cgroup properties.
fn cgroup_interface(unit: &str) -> &'static str {
    match unit.rsplit('.').next() {
        Some("slice") => "org.freedesktop.systemd1.Slice",
        Some("scope") => "org.freedesktop.systemd1.Scope",
        Some("socket") => "org.freedesktop.systemd1.Socket",
        Some("mount") => "org.freedesktop.systemd1.Mount",
        Some("swap") => "org.freedesktop.systemd1.Swap",
        _ => "org.freedesktop.systemd1.Service",
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_async = false,
    blocking_name = "UnitProxy"
)]
trait Unit {
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1",
    gen_async = false,
    blocking_name = "LoginManagerProxy"
)]
trait LoginManager {
    #[zbus(signal)]
    fn user_new(&self, uid: u32, path: OwnedObjectPath) -> zbus::Result<()>;
}

/// The system bus, shared by the driver, placement and the new-user watcher.
#[derive(Clone)]
pub struct SystemBus {
    connection: Connection,
}

fn call_error<'a>(
    call: &'static str,
    unit: &'a str,
) -> impl FnOnce(zbus::Error) -> SystemdError + 'a {
    move |source| SystemdError::Call {
        call,
        unit: unit.to_string(),
        source: Box::new(source),
    }
}

impl SystemBus {
    pub fn connect() -> Result<Arc<Self>, SystemdError> {
        let connection = Connection::system().map_err(|source| SystemdError::Connect {
            source: Box::new(source),
        })?;
        Ok(Arc::new(Self { connection }))
    }

    fn manager(&self) -> Result<ManagerProxy<'_>, SystemdError> {
        ManagerProxy::new(&self.connection).map_err(|source| SystemdError::Connect {
            source: Box::new(source),
        })
    }

    /// Calls `on_new(uid)` for every user logind starts, until the bus goes away. Blocks:
    /// run it on its own thread.
    pub fn watch_new_users(&self, mut on_new: impl FnMut(u32)) -> Result<(), SystemdError> {
        let login =
            LoginManagerProxy::new(&self.connection).map_err(|source| SystemdError::Connect {
                source: Box::new(source),
            })?;
        let signals = login
            .receive_user_new()
            .map_err(call_error("subscribing to UserNew", "logind"))?;
        for signal in signals {
            match signal.args() {
                Ok(args) => on_new(args.uid),
                Err(e) => tracing::warn!("logind UserNew signal: {e}"),
            }
        }
        Ok(())
    }
}

impl Bus for SystemBus {
    fn set_properties(&self, unit: &str, properties: &[Property]) -> Result<(), SystemdError> {
        let values: Vec<(&str, Value<'_>)> = properties
            .iter()
            .map(|p| (p.name(), Value::U64(p.value())))
            .collect();
        self.manager()?
            .set_unit_properties(unit, true, &values)
            .map_err(call_error("SetUnitProperties", unit))
    }

    fn get_properties(&self, unit: &str, names: &[&str]) -> Result<Vec<u64>, SystemdError> {
        let path = self
            .manager()?
            .load_unit(unit)
            .map_err(call_error("LoadUnit", unit))?;
        let proxy = zbus::blocking::Proxy::new(
            &self.connection,
            "org.freedesktop.systemd1",
            path,
            cgroup_interface(unit),
        )
        .map_err(call_error("reading properties of", unit))?;
        names
            .iter()
            .map(|name| {
                proxy
                    .get_property::<u64>(name)
                    .map_err(call_error("reading a property of", unit))
            })
            .collect()
    }

    fn start_unit(&self, unit: &str) -> Result<(), SystemdError> {
        self.manager()?
            .start_unit(unit, "replace")
            .map(drop)
            .map_err(call_error("StartUnit", unit))
    }

    fn unit_of_cgroup(&self, cgroup: &str) -> Result<Option<String>, SystemdError> {
        let path = match self.manager()?.get_unit_by_control_group(cgroup) {
            Ok(path) => path,
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                return Ok(None)
            }
            Err(e) => return Err(call_error("GetUnitByControlGroup", cgroup)(e)),
        };
        let unit = UnitProxy::builder(&self.connection)
            .path(path)
            .and_then(|b| b.build())
            .and_then(|u| u.id())
            .map_err(call_error("reading the Id of the unit owning", cgroup))?;
        Ok(Some(unit))
    }

    fn start_scope(
        &self,
        name: &str,
        slice: &str,
        description: &str,
        pids: &[u32],
    ) -> Result<(), SystemdError> {
        let properties = [
            ("Slice", Value::from(slice)),
            ("Description", Value::from(description)),
            ("PIDs", Value::from(pids.to_vec())),
            // Gone as soon as its last process exits, also when that process failed.
            ("CollectMode", Value::from("inactive-or-failed")),
        ];
        let aux: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
        self.manager()?
            .start_transient_unit(name, "fail", &properties, &aux)
            .map(drop)
            .map_err(call_error("StartTransientUnit", name))
    }
}
