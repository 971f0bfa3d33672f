"""*Install backend...*: runs installer.install_plan's commands one by one (QProcess), with the step and the
live log shown, a Cancel that kills the running step (QProcess.kill: no POSIX signal, so on Windows too)
and a re-run that picks up where the environment is. At the end the backend command is set to the venv,
the install record and the log are written to the profile, and `installed` asks for the local backend to
be started."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from ..core import installer, log, settings
from ..core.qt import QtCore, QtGui, QtWidgets, exec_dialog

NVIDIA_SMI_WAIT_MS = 10000
_Signal = QtCore.pyqtSignal if hasattr(QtCore, "pyqtSignal") else QtCore.Signal


def detect_cuda() -> tuple[tuple[int, int] | None, str]:
    """The NVIDIA driver's CUDA version from `nvidia-smi` (None when there is none) and what was seen."""
    process = QtCore.QProcess()
    process.setProcessChannelMode(QtCore.QProcess.ProcessChannelMode.MergedChannels)
    process.start("nvidia-smi", [])
    if not process.waitForStarted(NVIDIA_SMI_WAIT_MS):
        return None, "nvidia-smi: not found (no NVIDIA driver)"
    if not process.waitForFinished(NVIDIA_SMI_WAIT_MS):
        process.kill()
        process.waitForFinished(NVIDIA_SMI_WAIT_MS)
        return None, "nvidia-smi: no answer"
    output = bytes(process.readAllStandardOutput()).decode("utf-8", "replace")
    version = installer.parse_cuda_version(output)
    return (
        version,
        f"nvidia-smi: CUDA {version[0]}.{version[1]}" if version else "nvidia-smi: no CUDA version",
    )


class InstallDialog(QtWidgets.QDialog):
    """`home`, `wheel`, `torch` and `plan` default to this machine's; tests pass their own."""

    installed = _Signal(str)  # the venv, once every step succeeded

    def __init__(
        self,
        parent: Any = None,
        home: str | None = None,
        wheel: str | None = None,
        torch: installer.TorchBuild | None = None,
        plan: Any = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle(self.tr("EarthDial: install the backend"))
        self.home = home or installer.backend_home()
        self.venv = installer.venv_dir(self.home)
        self.wheel = wheel if wheel is not None else installer.shipped_wheel()
        seen = ""
        if torch is None:
            cuda, seen = detect_cuda()
            torch = installer.choose_torch(platform.system(), platform.machine(), cuda)
        self.torch = torch
        self._plan = plan or self._default_plan
        self.steps: list[installer.Step] = []
        self.index = -1
        self.process: QtCore.QProcess | None = None
        self.cancelled = False
        self.succeeded = False
        self.log_path = os.path.join(self.home, "install.log")
        self._log: list[str] = []  # the run's text as it came, for install.log

        python, why = installer.base_python()
        intro = QtWidgets.QLabel(
            self.tr(
                "The EarthDial backend (the model server) is installed into a Python environment of its own:\n"
                "{venv}\nQGIS's own Python is not changed, and no administrator rights are needed. "
                "It downloads torch and the backend's packages (about 1 GB for the CPU build, several GB "
                "for a CUDA build). When it is done, the local backend starts."
            ).format(venv=self.venv)
        )
        intro.setWordWrap(True)
        intro.setTextFormat(QtCore.Qt.TextFormat.PlainText)
        self.torch_label = QtWidgets.QLabel(self.tr("torch: {why}").format(why=self.torch.why))
        self.torch_label.setWordWrap(True)
        self.torch_label.setToolTip(seen)
        self.python_edit = QtWidgets.QLineEdit(python or "")
        self.python_edit.setPlaceholderText(why or self.tr("a Python 3.10+ program"))
        self.python_edit.setToolTip(
            self.tr("The Python that creates the environment (it installs nothing into itself)")
        )
        browse = QtWidgets.QPushButton(self.tr("Browse…"))
        browse.clicked.connect(self._browse_python)
        python_row = QtWidgets.QHBoxLayout()
        python_row.addWidget(QtWidgets.QLabel(self.tr("Python")))
        python_row.addWidget(self.python_edit, 1)
        python_row.addWidget(browse)
        self.step_label = QtWidgets.QLabel(self.tr("Not started"))
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.output_view = QtWidgets.QPlainTextEdit()
        self.output_view.setReadOnly(True)
        self.output_view.setLineWrapMode(QtWidgets.QPlainTextEdit.LineWrapMode.NoWrap)
        self.install_button = QtWidgets.QPushButton(self.tr("Install"))
        self.install_button.clicked.connect(self.install)
        self.cancel_button = QtWidgets.QPushButton(self.tr("Cancel"))
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.close_button = QtWidgets.QPushButton(self.tr("Close"))
        self.close_button.clicked.connect(self.reject)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.install_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.close_button)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.torch_label)
        layout.addLayout(python_row)
        layout.addWidget(self.step_label)
        layout.addWidget(self.progress)
        layout.addWidget(self.output_view, 1)
        layout.addLayout(buttons)
        self.resize(720, 480)
        if self.wheel is None:
            self.install_button.setEnabled(False)
            self.step_label.setText(
                self.tr(
                    "This copy of the plugin holds no backend wheel (wheels/): "
                    "install the plugin from its zip, or the backend by hand."
                )
            )

    def _browse_python(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, self.tr("A Python 3.10+ program"))
        if path:
            self.python_edit.setText(path)

    def _default_plan(self, python: str) -> list[installer.Step]:
        if self.wheel is None:  # the Install button is off without one
            return []
        requirement = installer.torch_requirement(self.wheel)
        return installer.install_plan(self.venv, python, self.wheel, self.torch, requirement)

    # -- running the plan -----------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.process is not None

    def install(self) -> None:
        """Build the plan for where the environment is now and run its first step."""
        if self.is_running():
            return
        python = self.python_edit.text().strip()
        if not os.path.isfile(python) and not installer.venv_ready(self.venv):
            self.step_label.setText(self.tr("Choose a Python 3.10+ program to create the environment with."))
            return
        os.makedirs(self.home, exist_ok=True)
        self.steps = self._plan(python)
        self.index, self.cancelled, self.succeeded = -1, False, False
        header = f"EarthDial backend install, {time.strftime('%Y-%m-%d %H:%M:%S')}\ntorch: {self.torch.why}\n"
        self._log = [header]
        self.output_view.setPlainText(header)
        self.progress.setRange(0, len(self.steps))
        self.progress.setValue(0)
        self.install_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        log.info(f"installing the backend into {self.venv}")
        self._next()

    def _next(self) -> None:
        self.index += 1
        self.progress.setValue(self.index)
        if self.index >= len(self.steps):
            self._done()
            return
        step = self.steps[self.index]
        self.step_label.setText(
            self.tr("Step {n} of {total}: {title}…").format(
                n=self.index + 1, total=len(self.steps), title=step.title
            )
        )
        self._append(f"\n$ {step.text()}\n")
        process = QtCore.QProcess(self)
        process.setProcessChannelMode(QtCore.QProcess.ProcessChannelMode.MergedChannels)
        env = QtCore.QProcessEnvironment.systemEnvironment()
        for name in (
            "PYTHONPATH",
            "PYTHONHOME",
            "VIRTUAL_ENV",
        ):  # QGIS's own: the venv's Python must not see them
            env.remove(name)
        env.insert("PYTHONUNBUFFERED", "1")
        env.insert("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(self._output)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._error)
        self.process = process
        process.start(step.program, list(step.args))

    def _output(self) -> None:
        if self.process is not None:
            self._append(bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace"))

    def _append(self, text: str) -> None:
        self._log.append(text)
        self.output_view.moveCursor(QtGui.QTextCursor.MoveOperation.End)
        self.output_view.insertPlainText(text)
        self.output_view.moveCursor(QtGui.QTextCursor.MoveOperation.End)

    def _error(self, error: Any) -> None:
        if error == QtCore.QProcess.ProcessError.FailedToStart and self.process is not None:
            step = self.steps[self.index]
            self._stop(
                self.tr("{title} could not be started: {why}").format(
                    title=step.title, why=self.process.errorString()
                )
            )

    def _finished(self, code: int, _status: Any = None) -> None:
        if self.process is None:
            return
        self._output()
        self._release()
        if self.cancelled:
            self._stop(self.tr("Cancelled. Install again to go on: what is installed already is kept."))
        elif code != 0:
            step = self.steps[self.index]
            self._stop(
                self.tr(
                    "{title} failed (exit code {code}); the log above says why. Fix it and install "
                    "again: finished steps are kept."
                ).format(title=step.title, code=code)
            )
        else:
            self._next()

    def _release(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            for signal, slot in (
                (process.finished, self._finished),
                (process.errorOccurred, self._error),
                (process.readyReadStandardOutput, self._output),
            ):
                try:
                    signal.disconnect(slot)
                except (TypeError, RuntimeError):
                    pass
            process.deleteLater()

    def cancel(self) -> None:
        """Stop the running step for good (pip leaves what it finished; a re-run goes on from there)."""
        if self.process is None:
            return
        self.cancelled = True
        self.cancel_button.setEnabled(False)
        self._append("\n[cancelled]\n")
        self.process.kill()  # TerminateProcess on Windows, SIGKILL elsewhere: QProcess's own, portable

    def _stop(self, message: str) -> None:
        self._release()
        self.step_label.setText(message)
        self._append(f"\n{message}\n")
        self._save_log()
        log.warning(message)
        self.install_button.setText(self.tr("Install again"))
        self.install_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _done(self) -> None:
        self.succeeded = True
        if self.wheel is not None:
            installer.write_record(self.home, self.wheel, self.torch)
        settings.set_value(settings.BACKEND_COMMAND, self.venv)
        message = self.tr("Installed. The backend command is now {venv}; starting the local backend…").format(
            venv=self.venv
        )
        self.step_label.setText(message)
        self._append(f"\n{message}\n")
        self._save_log()
        log.info(message)
        self.install_button.setText(self.tr("Install again"))
        self.install_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.installed.emit(self.venv)
        self._report_machine()

    def _report_machine(self) -> None:
        """What the installed backend says this machine can run (GPU, driver, torch build, free memory, the
        memory plan and its recommendation), shown after the log and saved with it: the first question
        after an install is which device and precision to serve with."""
        from .diagnostics import MachineDiagnosis, machine_lines

        def show(machine: Any, why: str) -> None:
            self._append("\n".join(machine_lines(None, machine, why)) + "\n")
            self._save_log()

        self.diagnosis = MachineDiagnosis(self)
        self.diagnosis.done.connect(show)
        self._append("\n" + self.tr("Asking the backend what this machine can run…") + "\n")
        self.diagnosis.start(self.venv)

    def _save_log(self) -> None:
        """The whole run's output, beside the venv: what to attach to a bug report."""
        try:
            with open(self.log_path, "w", encoding="utf-8") as f:
                f.write("".join(self._log))
        except OSError as e:
            log.error(f"could not write {self.log_path}: {e}")
            return
        self._append(self.tr("The log is saved in {path}").format(path=self.log_path) + "\n")

    def reject(self) -> None:
        if self.is_running():
            self.cancel()
        super().reject()

    def run(self) -> int:
        return exec_dialog(self)
